"""The guide's ``encode_text(String)`` / ``encode_image(path)`` UDFs, for real.

``install_udfs(dir)`` writes, as in the guide, a Python script and an XML definition per
function — but as ``executable_pool`` (ClickHouse keeps the process, so the model is loaded
once, not per call), with the interpreter of the environment that has the model, and with the
model chosen at install time. Put the scripts in a ClickHouse server's ``user_scripts/`` and the
XML files where ``user_defined_executable_functions_config`` points; the embedded store loads
``<store>/udf/`` by itself (``laion udf install --db PATH``), so that SQL such as

    SELECT url FROM laion ORDER BY cosineDistance(text_embedding, encode_text('a dog and a cat')) LIMIT 10

runs verbatim through ``laion sql``.

Protocol (``TabSeparated``): one escaped value per line on stdin, one ``[f1,f2,…]`` per line on
stdout, flushed per row. On a bad input the script writes the reason to stderr and exits
non-zero, which ClickHouse reports as the query's error.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

FUNCTIONS = {"text": "encode_text", "image": "encode_image"}
ARGUMENT = {"text": "text", "image": "path"}

XML = """<functions>
    <function>
        <type>executable_pool</type>
        <name>{name}</name>
        <return_type>Array(Float32)</return_type>
        <argument>
            <type>String</type>
            <name>{argument}</name>
        </argument>
        <format>TabSeparated</format>
        <command>{name}.py</command>
        <command_read_timeout>1000000</command_read_timeout>
        <pool_size>{pool_size}</pool_size>
        <stderr_reaction>throw</stderr_reaction>
    </function>
</functions>
"""

SCRIPT = """#!{python}
# Written by `laion udf install`: ClickHouse executable_pool UDF {name}(String) -> Array(Float32).
# Model: {model_label}. The interpreter above is the environment that has laion-search[clip].
from laion_search.clip.udf import serve

raise SystemExit(serve({kind!r}, {model!r}))
"""


def install_udfs(directory: str | os.PathLike[str], *, python: str | None = None, model: str | None = None,
                 pool_size: int = 1) -> list[Path]:
    """Write ``encode_text.py``, ``encode_image.py`` and their ``*_function.xml`` into ``directory``."""
    from laion_search.clip.encoders import resolve_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    python = python or sys.executable
    resolved = resolve_model(model)
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())  # the engine runs the script from another directory
    written = []
    for kind, name in FUNCTIONS.items():
        script = out / f"{name}.py"
        script.write_text(SCRIPT.format(python=python, name=name, kind=kind, model=model,
                                        model_label=model or f"default ({resolved})"))
        script.chmod(0o755)
        xml = out / f"{name}_function.xml"
        xml.write_text(XML.format(name=name, argument=ARGUMENT[kind], pool_size=int(pool_size)))
        written += [script, xml]
    return written


SERVER_CONFIG = """<clickhouse>
    <!-- where the *_function.xml files are (glob) and where their scripts run from -->
    <user_defined_executable_functions_config>/etc/clickhouse-server/*_function.xml</user_defined_executable_functions_config>
    <user_scripts_path>/var/lib/clickhouse/user_scripts/</user_scripts_path>
</clickhouse>"""


def server_instructions(directory: str | os.PathLike[str]) -> str:
    """What to do with the files on a ClickHouse server (we cannot write into its config over SQL).

    On a cluster, do it on every node: the functions run where the query's rows are."""
    d = Path(directory)
    return (f"On every ClickHouse server node (we cannot write there over SQL):\n"
            f"  1. copy {d}/encode_text.py and {d}/encode_image.py to user_scripts_path "
            f"(default /var/lib/clickhouse/user_scripts/), executable by the clickhouse user;\n"
            f"  2. copy {d}/*_function.xml to the directory matched by user_defined_executable_functions_config\n"
            f"     (default /etc/clickhouse-server/*_function.xml); e.g. config.d/laion-udf.xml:\n"
            + "\n".join("       " + line for line in SERVER_CONFIG.splitlines()) + "\n"
            "  3. the scripts' first line names the Python with laion-search[clip]: install it on the server\n"
            "     (or rewrite with --python PATH) and put the CLIP model there (--model DIR);\n"
            "  4. run: SYSTEM RELOAD FUNCTIONS   (ON CLUSTER name, on a cluster)")


_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r", "\\0": "\0", "\\'": "'", "\\b": "\b",
             "\\f": "\f", "\\a": "\a", "\\v": "\v"}
_ESCAPE_RE = re.compile(r"\\.")


def tsv_unescape(field: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _UNESCAPE.get(m.group(0), m.group(0)[1]), field)


def format_vector(vec) -> str:
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


def serve(kind: str, model: str | None = None, stdin=None, stdout=None, stderr=None) -> int:
    """The UDF process: read values, write vectors, until stdin closes."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    from laion_search.clip.encoders import get_encoder
    from laion_search.errors import LaionError

    try:
        enc = get_encoder(model)
    except LaionError as exc:
        stderr.write(f"{FUNCTIONS[kind]}: {exc}\n")
        stderr.flush()
        return 1
    for line in stdin:
        value = tsv_unescape(line.rstrip("\n"))
        try:
            vec = enc.encode_text([value])[0] if kind == "text" else enc.encode_image([value])[0]
        except LaionError as exc:
            stderr.write(f"{FUNCTIONS[kind]}: {exc}\n")
            stderr.flush()
            return 1
        stdout.write(format_vector(vec) + "\n")
        stdout.flush()
    return 0
