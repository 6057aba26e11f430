-- wrk script for ops/bench-serve.sh: every request asks for the narinfo of
-- a random store-path hash, which no cache holds. Nix asks for many paths a
-- cache does not have, and a miss cannot be answered from a cache of
-- answers, so this measures the lookup behind every narinfo.
--
--   wrk ... -s random-narinfo.lua http://HOST:PORT -- /CACHE/
--
-- The Authorization header given with -H is sent along (wrk.format uses
-- wrk.headers).

local alphabet = "0123456789abcdfghijklmnpqrsvwxyz" -- Nix's base-32
local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("thread_number", threads)
end

function init(args)
    prefix = args[1] or "/"
    -- A different sequence in each thread and each run.
    math.randomseed(os.time() * 1000 + (thread_number or 0))
end

function request()
    local hash = {}
    for i = 1, 32 do
        local k = math.random(1, 32)
        hash[i] = alphabet:sub(k, k)
    end
    return wrk.format("GET", prefix .. table.concat(hash) .. ".narinfo")
end
