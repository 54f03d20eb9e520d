-- wrk: clicks over 1000 banners instead of one hot URL, counting what was
-- sent, so that the benchmark can bound the stored clicks on both sides:
-- answered 2xx <= stored <= sent.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function request()
  sent = sent + 1
  return wrk.format("GET", "/counter/" .. math.random(1, 1000))
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("sent")
  end
  io.write(string.format("sent: %d\n", total))
end
