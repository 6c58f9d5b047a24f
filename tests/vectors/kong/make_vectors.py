"""Regenerate vectors.json: LuaJIT encodes each case, the expected value is written by hand.

Run from the repository root with Debian's ``luajit`` (package luajit2) on PATH:

    python tests/vectors/kong/make_vectors.py

The expected values below are typed in, never produced by shared.luabuf, so the vectors
check the decoder against LuaJIT rather than against itself. LuaJIT writes hash entries in
an order that changes between processes, so a rerun may change the hex but not the values.
The JSON rendering of values is described in README.md next to this script.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
DICTIONARY = ("spec", "data", "source", "event", "wid", "unique")

Json = object


def rep(unit: str, count: int) -> Json:
    return {"$rep": [unit, count]}


def table(*pairs: tuple[Json, Json]) -> Json:
    return {"$table": [list(pair) for pair in pairs]}


def nested(depth: int) -> Json:
    value: Json = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


EVENT = '{source="src", event="evt", data=%s, wid=0}'
NULL_J: Json = {"$null": None}

# (name, Lua expression, expected value). The first 24 are the data cases of the captures
# in the lua-resty-events 0.3.1 research (README of shared/vectors/kong), encoded alone.
CASES: list[tuple[str, str, Json]] = [
    ("case01", '{a=1, b="x"}', {"a": 1, "b": "x"}),
    ("case02", "nil", None),
    ("case03", "true", True),
    ("case04", "false", False),
    ("case05", "0", 0),
    ("case06", "1", 1),
    ("case07", "-1", -1),
    ("case08", "1.5", 1.5),
    ("case09", "2^31", 2147483648),
    ("case10", '""', ""),
    ("case11", '"hello"', "hello"),
    ("case12", 'string.rep("y", 300)', rep("y", 300)),
    ("case13", "{}", {}),
    ("case14", "{1, 2, 3}", [1, 2, 3]),
    ("case15", '{"a", "b", k="v"}', table((1, "a"), (2, "b"), ("k", "v"))),
    (
        "case16",
        "{nested={deep={x=true}}, list={10,20}}",
        {"nested": {"deep": {"x": True}}, "list": [10, 20]},
    ),
    ("case17", '{[0]="zero", "one"}', table((0, "zero"), (1, "one"))),
    ("case18", '"data"', "data"),
    ("case19", 'string.rep("z", 9000)', rep("z", 9000)),
    ("case20", '{[1]="a", [3]="c"}', table((1, "a"), (3, "c"))),
    ("case21", "NULL", NULL_J),
    ("case22", "1e300", 1e300),
    ("case23", "-0.25", -0.25),
    ("case24", "123456789", 123456789),
    # The messages of the protocol.
    ("hello", "{id=0, pid=1234}", {"id": 0, "pid": 1234}),
    ("hello-agent", "{id=-1, pid=30758}", {"id": -1, "pid": 30758}),
    ("event", EVENT % '"hello"', {"source": "src", "event": "evt", "data": "hello", "wid": 0}),
    ("event-no-data", EVENT % "nil", {"source": "src", "event": "evt", "wid": 0}),
    (
        "event-table-data",
        EVENT % "{k={1,2}}",
        {"source": "src", "event": "evt", "data": {"k": [1, 2]}, "wid": 0},
    ),
    (
        "publish-all",
        "{spec={}, data=enc(%s)}" % (EVENT % "1.5"),
        {
            "spec": {},
            "data": {"$encoded": {"source": "src", "event": "evt", "data": 1.5, "wid": 0}},
        },
    ),
    (
        "publish-unique",
        '{spec={unique="u1"}, data=enc(%s)}' % (EVENT % "true"),
        {
            "spec": {"unique": "u1"},
            "data": {"$encoded": {"source": "src", "event": "evt", "data": True, "wid": 0}},
        },
    ),
    # Length classes of the prefix-encoded lengths.
    ("str-191", 'string.rep("s", 191)', rep("s", 191)),
    ("str-192", 'string.rep("s", 192)', rep("s", 192)),
    ("str-8127", 'string.rep("s", 8127)', rep("s", 8127)),
    ("str-8128", 'string.rep("s", 8128)', rep("s", 8128)),
    (
        "array-300",
        "(function() local t = {} for i = 1, 300 do t[i] = i end return t end)()",
        list(range(1, 301)),
    ),
    # Strings.
    ("str-utf8", '"\\195\\169\\226\\130\\172"', "é€"),
    ("str-not-utf8", '"\\255\\254"', {"$bytes": "fffe"}),
    ("str-nul", '"a\\0b"', "a\x00b"),
    # Numbers.
    ("negative-zero", "-0.0", {"$float": "-0.0"}),
    ("inf", "1/0", {"$float": "inf"}),
    ("minus-inf", "-1/0", {"$float": "-inf"}),
    ("nan", "0/0", {"$float": "nan"}),
    ("two-pow-53", "2^53", 2**53),
    ("two-pow-53-plus-2", "2^53+2", float(2**53 + 2)),
    ("int64", "1152921504606846976LL", 2**60),
    ("int64-small", "-5LL", -5),
    ("uint64-max", "18446744073709551615ULL", 2**64 - 1),
    ("complex", 'ffi.new("complex", 1.5, -2)', {"$complex": [1.5, -2.0]}),
    # Tables.
    ("array-hole", '{"a", nil, "c"}', table((1, "a"), (3, "c"))),
    ("zero-based-and-hash", '{[0]="z", "a", k=true}', table((0, "z"), (1, "a"), ("k", True))),
    ("array-and-hash", '{1, 2, "x", k=true}', table((1, 1), (2, 2), (3, "x"), ("k", True))),
    (
        "dictionary-keys",
        '{spec="a", data="b", source="c", event="d", wid="e", unique="f"}',
        {"spec": "a", "data": "b", "source": "c", "event": "d", "wid": "e", "unique": "f"},
    ),
    ("dictionary-values", '{"spec", "unique"}', ["spec", "unique"]),
    (
        "scalar-keys",
        '{[1.5]="a", [-3]="b", [true]="t", [false]="f", [""]="e"}',
        table((1.5, "a"), (-3, "b"), (True, "t"), (False, "f"), ("", "e")),
    ),
    ("null-key-and-values", "{[NULL]={NULL, NULL}}", table((NULL_J, [NULL_J, NULL_J]))),
    (
        "depth-100",
        "(function() local t = {} for _ = 1, 99 do t = {x=t} end return t end)()",
        nested(100),
    ),
]

# Values LuaJIT writes and reads but shared.luabuf refuses (docs/kong-codec.md, "Stricter").
ERROR_CASES: list[tuple[str, str]] = [
    ("error-table-key", "{[{}]=1}"),
    ("error-true-and-1-keys", '{[true]="t", [1]="one"}'),
]

LUA = r"""
local buffer = require "string.buffer"
ffi = require "ffi"
NULL = buffer.decode("\3")
local encoder = buffer.new({dict = {%s}})
function enc(value)
  return encoder:reset():encode(value):get()
end
local function hex(s)
  return (s:gsub(".", function(c) return string.format("%%02x", c:byte()) end))
end
for line in io.lines() do
  local payload = enc(assert(loadstring("return " .. line))())
  local n = #payload
  local header = string.char(math.floor(n / 65536), math.floor(n / 256) %% 256, n %% 256)
  io.write(hex(header .. payload), "\n")
end
"""


def main() -> int:
    exprs = [lua for _, lua, _ in CASES] + [lua for _, lua in ERROR_CASES]
    script = LUA % ", ".join(f'"{word}"' for word in DICTIONARY)
    result = subprocess.run(
        ["luajit", "-e", script],
        input="\n".join(exprs) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    frames = result.stdout.split()
    assert len(frames) == len(exprs), result.stderr
    vectors: list[dict[str, Json]] = []
    for (name, lua, value), frame in zip(CASES, frames[: len(CASES)], strict=True):
        vectors.append({"name": name, "lua": lua, "hex": frame, "value": value})
    for (name, lua), frame in zip(ERROR_CASES, frames[len(CASES) :], strict=True):
        vectors.append({"name": name, "lua": lua, "hex": frame, "error": "RemoteProtocolError"})
    out = HERE / "vectors.json"
    out.write_text(
        json.dumps(
            {"luajit": _luajit_version(), "dictionary": list(DICTIONARY), "vectors": vectors},
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    sys.stdout.write(f"wrote {len(vectors)} vectors to {out}\n")
    return 0


def _luajit_version() -> str:
    return subprocess.run(
        ["luajit", "-v"], capture_output=True, text=True, check=True
    ).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
