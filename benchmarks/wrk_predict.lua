-- POST /predict with the bodies of a JSON-lines file (one request body per line), in turn;
-- with "-" for the file, plain GETs (the /healthz floor).
-- Usage: wrk -s benchmarks/wrk_predict.lua <url>/predict -- <bodies.jsonl|-> [api key]
local bodies = {}
local counter = 0

function init(args)
  if args[1] ~= "-" then
    for line in io.lines(args[1]) do
      if #line > 0 then bodies[#bodies + 1] = line end
    end
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
  end
  if args[2] and #args[2] > 0 then wrk.headers["Authorization"] = "Bearer " .. args[2] end
end

function request()
  if #bodies == 0 then return wrk.format() end
  counter = counter % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[counter])
end

-- One machine-readable line per run, read by benchmarks/serving.py.
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect, errors.read, errors.write, errors.timeout))
end
