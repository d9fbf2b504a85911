-- wrk script of bench/hit_path.py: POST one fixed JSON body, count 200s and cache hits,
-- and print exact latency percentiles in microseconds on one line that the harness parses.
--
--   wrk -t2 -c32 -d10s -s bench/wrk_post.lua URL -- BODY_FILE AUTHORIZATION [any|hit]
--
-- "hit" counts a response as a hit only when its Cache-Status header says "; hit;";
-- "any" (the backend, which sends no Cache-Status) counts every 200 as good.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

good, bad_status, not_hit = 0, 0, 0
local want_hit = false

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.headers["Authorization"] = args[2]
   want_hit = args[3] == "hit"
end

function response(status, headers, body)
   if status ~= 200 then
      bad_status = bad_status + 1
   elseif want_hit then
      local cs = headers["Cache-Status"] or headers["cache-status"]
      if cs and string.find(cs, "; hit;", 1, true) then
         good = good + 1
      else
         not_hit = not_hit + 1
      end
   else
      good = good + 1
   end
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local g, b, n = 0, 0, 0
   for _, t in ipairs(threads) do
      g = g + t:get("good")
      b = b + t:get("bad_status")
      n = n + t:get("not_hit")
   end
   local e = summary.errors
   io.write(string.format(
      "EDGECACHE-BENCH requests=%d duration_us=%d good=%d bad_status=%d not_hit=%d "
      .. "connect_errors=%d read_errors=%d write_errors=%d timeouts=%d "
      .. "p50_us=%d p75_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f\n",
      summary.requests, summary.duration, g, b, n,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency.max, latency.mean))
end
