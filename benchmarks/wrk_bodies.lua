-- wrk script: PUT each payload file in turn, raw bytes, and print the result as one JSON line.
--   wrk -c 32 -d 10s -s wrk_bodies.lua URL -- /predictions/fmnist FILE...
local requests = {}
local idx = 0
local threads = {}
codes = {} -- per thread: HTTP status (>= 300) -> count, collected in done()
samples = {} -- per thread: HTTP status (>= 300) -> the start of one such answer's body

function setup(thread)
  threads[#threads + 1] = thread
end

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

function response(status, _, body)
  if status >= 300 then
    codes[status] = (codes[status] or 0) + 1
    if not samples[status] then
      samples[status] = string.gsub(string.sub(body or "", 1, 160), '[%c"\\]', " ")
    end
  end
end

function done(summary, latency, _)
  local e = summary.errors
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("codes")) do
      total[code] = (total[code] or 0) + n
    end
  end
  local parts, texts = {}, {}
  for code, n in pairs(total) do
    parts[#parts + 1] = string.format('"%d": %d', code, n)
  end
  for _, t in ipairs(threads) do
    for code, text in pairs(t:get("samples")) do
      texts[#texts + 1] = string.format('"%d": "%s"', code, text)
    end
  end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "codes": {%s}, "samples": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, table.concat(parts, ", "),
    table.concat(texts, ", ")))
end
