-- wrk: impressions of one campaign by many users (campaign id from the
-- CAMPAIGN environment variable), for impressions/s beside clicks/s.
local campaign = os.getenv("CAMPAIGN")

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function request()
  local body = string.format('{"campaign_id": "%s", "user_id": "u%d", "ad_id": "a1"}',
                             campaign, math.random(1, 100000))
  return wrk.format("POST", "/api/v1/impressions", {["Content-Type"] = "application/json"}, body)
end
