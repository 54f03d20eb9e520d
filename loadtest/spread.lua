-- wrk: clicks over 1000 banners instead of one hot URL
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/counter/" .. math.random(1, 1000))
end
