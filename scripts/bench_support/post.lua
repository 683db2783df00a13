-- wrk script of scripts/bench: POST one fixed JSON body, print the figures as one JSON line.
--
-- Environment (read in every wrk thread):
--   BENCH_BODY          file with the request body (required)
--   BENCH_CONTENT_TYPE  default application/json
--   BENCH_DELAY_MS      > 0: each connection waits a random 0..2x this many ms before each
--                       request (mean = BENCH_DELAY_MS): a rate limit for plain wrk, which has
--                       none of its own. Latency is measured from the send, as wrk always does.
--   BENCH_COUNT_STATUS  "1": count every response status (defining response() costs wrk some
--                       CPU, so it is only done when the exact answer codes matter)
-- Output: a line "BENCH_JSON {...}" with requests, duration_us, errors, latency percentiles (µs)
-- and, with BENCH_COUNT_STATUS, {"statuses": {"202": n, "503": m}}.

local body_file = os.getenv("BENCH_BODY")
local f = assert(io.open(body_file, "rb"), "cannot open BENCH_BODY " .. tostring(body_file))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"

local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if delay_ms > 0 then
  function delay()
    return math.random() * 2 * delay_ms
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if os.getenv("BENCH_COUNT_STATUS") == "1" then
  function init(args)
    statuses = {}
  end

  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  table.insert(parts, string.format('"requests":%d,"duration_us":%d,"bytes":%d', summary.requests, summary.duration, summary.bytes))
  table.insert(parts, string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
    e.connect, e.read, e.write, e.status, e.timeout))
  table.insert(parts, string.format('"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}',
    latency.mean, latency.stdev, latency.max, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
  if os.getenv("BENCH_COUNT_STATUS") == "1" then
    local total = {}
    for _, t in ipairs(threads) do
      local s = t:get("statuses")
      if s then
        for code, n in pairs(s) do
          total[code] = (total[code] or 0) + n
        end
      end
    end
    local items = {}
    for code, n in pairs(total) do
      table.insert(items, string.format('"%d":%d', code, n))
    end
    table.insert(parts, '"statuses":{' .. table.concat(items, ",") .. "}")
  end
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
