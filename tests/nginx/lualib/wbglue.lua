-- Glue between a real nginx running lua-resty-events and tests/test_nginx_interop.py.
--
-- Our own code, not lua-resty-events'. It
--   * creates the events object in init_by_lua and starts it in init_worker_by_lua;
--   * subscribes one handler to every event; the handler checks the value it got against
--     the case named by the event name (CASES below, mirrored by the Python test) and
--     appends a JSON record to a shared dict, so any worker can report what all of them saw;
--   * serves a small control API on a unix socket: POST /publish?case=..&target=..&source=..
--     &count=..&worker=.., GET /received, GET /ready, GET /closed (http); in a stream {}
--     block the same as one command line per connection (control_stream below);
--   * offers run() as the content handler of the events socket (the broker side), and
--     closed() for its log phase, which counts the events connections that have ended.
--
-- Values are compared in Lua, independently of the Python codec under test: a "mismatch"
-- verdict means Lua received something other than what the case says Python sent.

local cjson = require "cjson.safe"

local ngx = ngx
local null = ngx.null
local shared = ngx.shared

local _M = {}

local ev
local broker_only

-- Each case builds a fresh value; the Python test has the same names with its own values.
local CASES = {
    ping = function() return "ping" end,
    int = function() return 42 end,
    neg_float = function() return -0.25 end,
    huge_float = function() return 1e300 end,
    big_double = function() return 2 ^ 53 end,
    int64 = function() return 1152921504606846977LL end,
    str = function() return "hello" end,
    utf8 = function() return "h\195\169llo \226\156\147" end,
    bytes = function() return "\255\000\001binary" end,
    empty_str = function() return "" end,
    dict_word = function() return "data" end,
    ["true"] = function() return true end,
    ["false"] = function() return false end,
    none = function() return nil end,
    null = function() return null end,
    list = function() return { 1, 2, 3 } end,
    nested = function() return { a = 1, b = { c = { true, false } }, s = "x" } end,
    null_in_table = function() return { v = null, list = { 1, null, 3 } } end,
    sparse = function() return { [1] = "a", [3] = "c" } end,
    zero_based = function() return { [0] = "zero", "one" } end,
    empty_table = function() return {} end,
    big_string = function() return string.rep("z", 200000) end,
}

local function deep_equal(a, b, depth)
    if depth > 100 then
        return false
    end
    if type(a) ~= type(b) then
        return false
    end
    if type(a) ~= "table" then
        -- numbers, strings, booleans, ngx.null (lightuserdata) and int64 cdata all
        -- compare by value with ==
        return a == b
    end
    local n = 0
    for k, v in pairs(a) do
        n = n + 1
        if not deep_equal(v, b[k], depth + 1) then
            return false
        end
    end
    for _ in pairs(b) do
        n = n - 1
    end
    return n == 0
end

-- A short, JSON-safe description of a received value, for failure messages.
local function describe(v, depth)
    local t = type(v)
    if t == "string" then
        if #v <= 40 and not v:find("[^%w%p ]") then
            return string.format("%q", v)
        end
        local hex = v:sub(1, 16):gsub(".", function(c) return string.format("%02x", c:byte()) end)
        return string.format("bytes(len=%d, %s..)", #v, hex)
    elseif t == "number" then
        return string.format("%.17g", v)
    elseif t == "table" then
        if depth > 5 then
            return "{...}"
        end
        local parts = {}
        for k, val in pairs(v) do
            parts[#parts + 1] = "[" .. describe(k, depth + 1) .. "]=" .. describe(val, depth + 1)
        end
        table.sort(parts)
        return "{" .. table.concat(parts, ", ") .. "}"
    elseif v == null then
        return "ngx.null"
    end
    return t .. ":" .. tostring(v)
end

local function record(data, event, source, wid)
    local dict = shared.wb_records
    local expected = CASES[event]
    local verdict = "unknown-case"
    if expected then
        verdict = deep_equal(data, expected(), 0) and "ok" or "mismatch"
    end
    local n = dict:incr("n", 1, 0)
    dict:set("r" .. n, cjson.encode({
        receiver = ngx.worker.id(),
        source = source,
        event = event,
        wid = wid,
        verdict = verdict,
        data = describe(data, 0),
    }))
end

-- opts: the lua-resty-events options; stub_disable_listening: replace the FFI call into
-- the C module (not built here) by a no-op, for setups where nothing nginx listens on
-- needs closing (nginx workers using an outside broker); only_broker: start the broker
-- side but no events client in nginx, so that worker id 0 is free for an outside peer
-- (used to run the conformance kit against the real broker).
function _M.init(opts, stub_disable_listening, only_broker)
    broker_only = only_broker
    if stub_disable_listening then
        -- before resty.events is loaded: init.lua keeps the function it required
        package.loaded["resty.events.disable_listening"] = function() return true end
    end
    ev = require("resty.events").new(opts)
end

local function mark_ready(premature)
    if premature then
        return
    end
    shared.wb_records:set("ready" .. ngx.worker.id(), ev:is_ready() and true or false)
end

function _M.init_worker()
    if broker_only then
        -- what ev:init_worker() does on the broker worker, minus starting the client
        local ok, err = ev.broker:init()
        if not ok then
            ngx.log(ngx.ERR, "wbglue: broker init failed: ", err)
        end
        return
    end
    ev:subscribe("*", "*", record)
    local ok, err = ev:init_worker()
    if not ok then
        ngx.log(ngx.ERR, "wbglue: init_worker failed: ", err)
        return
    end
    assert(ngx.timer.every(0.02, mark_ready))
end

function _M.run()
    return ev:run()
end

-- Publish `count` times from this worker; returns an HTTP-like status and a message.
-- worker=N: publish only from nginx worker N (nginx picks a worker per connection, so the
-- caller retries on 409); one publisher keeps a batch in publish order.
local function publish(case, source, target, count, wanted)
    local make = case and CASES[case]
    if not make then
        return 400, "unknown case " .. tostring(case)
    end
    if wanted and wanted ~= ngx.worker.id() then
        return 409, "this is worker " .. ngx.worker.id()
    end
    for _ = 1, count or 1 do
        local ok, err = ev:publish(target or "all", source or "lua", case, make())
        if not ok then
            return 500, tostring(err)
        end
    end
    return 200, "published by worker " .. ngx.worker.id()
end

local function received_json()
    local dict = shared.wb_records
    local items = {}
    for i = 1, dict:get("n") or 0 do
        items[#items + 1] = dict:get("r" .. i)
    end
    return "[" .. table.concat(items, ",") .. "]"
end

local function ready_states()
    local dict = shared.wb_records
    local states = {}
    for i = 0, ngx.worker.count() - 1 do
        states[#states + 1] = dict:get("ready" .. i) and "1" or "0"
    end
    return table.concat(states, "")
end

function _M.publish()
    local args = ngx.req.get_uri_args()
    local status, msg = publish(args.case, args.source, args.target, tonumber(args.count),
                                tonumber(args.worker))
    ngx.status = status
    ngx.say(msg)
end

function _M.received()
    ngx.header["Content-Type"] = "application/json"
    ngx.say(received_json())
end

function _M.ready()
    ngx.say(ready_states())
end

-- The log phase of an events connection: it has ended, whatever run() logged before.
function _M.closed()
    shared.wb_records:incr("closed", 1, 0)
end

function _M.closed_count()
    ngx.say(shared.wb_records:get("closed") or 0)
end

-- The control API of a stream {} block: one command line per connection, one answer line
-- "STATUS TEXT" back, then close. Commands:
--   publish CASE SOURCE TARGET COUNT WORKER   (WORKER "-" for any worker)
--   received | ready | closed
function _M.control_stream()
    local sock = assert(ngx.req.socket(true))
    sock:settimeout(5000)
    local line, err = sock:receive("*l")
    if not line then
        ngx.log(ngx.ERR, "wbglue: control: ", err)
        return
    end
    local words = {}
    for word in line:gmatch("%S+") do
        words[#words + 1] = word
    end
    local status, msg = 400, "unknown command " .. tostring(words[1])
    if words[1] == "publish" then
        status, msg = publish(words[2], words[3], words[4], tonumber(words[5]),
                              tonumber(words[6]))
    elseif words[1] == "received" then
        status, msg = 200, received_json()
    elseif words[1] == "ready" then
        status, msg = 200, ready_states()
    elseif words[1] == "closed" then
        status, msg = 200, tostring(shared.wb_records:get("closed") or 0)
    end
    sock:send(status .. " " .. msg .. "\n")
end

return _M
