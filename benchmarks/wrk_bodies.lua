-- wrk script: PUT each payload file in turn, raw bytes, and print the result as one JSON line.
--   wrk -c 32 -d 10s -s wrk_bodies.lua URL -- /predictions/fmnist FILE...
local requests = {}
local idx = 0

function init(args)
  local path = args[1]
  for i = 2, #args do
    local f = assert(io.open(args[i], "rb"))
    local body = f:read("*a")
    f:close()
    requests[#requests + 1] = wrk.format("PUT", path, {["Content-Type"] = "application/octet-stream"}, body)
  end
  idx = math.random(#requests) - 1 -- threads and connections start at different payloads
end

function request()
  idx = idx % #requests + 1
  return requests[idx]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
