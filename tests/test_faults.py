"""Faults and hostile inputs against one small artifact folder: kills, concurrent writers, forged and corrupted files.

Every case asserts what a user (or an attacker) gets: exit 2 (or the right `ShivaError` from the API) with one line
and no traceback, no file opened outside the folder (an audit hook watches a sentinel folder beside it, and
/etc/passwd), and, after a fault, a folder that still loads and inspects clean.

The folder: the session's tiny-sd35 export (freeze + export, 2 buckets) plus ORT engine links, copied per case.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from shiva_export.cli import main
from shiva_export.errors import ShivaError

VERBS = {
    "inspect": lambda out: ["inspect", "--out", str(out)],
    "engine": lambda out: ["engine", "--backend", "ort", "--out", str(out)],
    "check": lambda out: ["check", "--out", str(out), "--backend", "ort", "--no-trajectory"],
    "bench": lambda out: ["bench", "--out", str(out), "--backend", "onnxruntime", "--runs", "1", "--warmup", "0",
                          "--loop-runs", "1"],
}
HANG_GUARD_S = 900  # generous: only catches a hang, says nothing about speed

# ----------------------------------------------------------------------------------------------- reads outside
_WATCHED: list[Path] = []
_OUTSIDE_READS: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path == "/etc/passwd" or any(path.startswith(str(w)) for w in _WATCHED):
            _OUTSIDE_READS.append(path)


sys.addaudithook(_audit)  # an audit hook cannot be removed; it only records while a case watches


class Watch:
    """Records every open() of a file under `folder` (and of /etc/passwd) while active."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()

    def __enter__(self) -> list[str]:
        _OUTSIDE_READS.clear()
        _WATCHED.append(self.folder)
        return _OUTSIDE_READS

    def __exit__(self, *exc) -> None:
        _WATCHED.remove(self.folder)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The session export plus ORT engine links (engine stage recorded)."""
    from shiva_export import pipeline

    root = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("faults") / "artifact"))
    ws = pipeline.Workspace(root)
    pipeline.run_engines(ws, "ort")
    del ws
    return root


@pytest.fixture
def folder(engine_artifact, tmp_path) -> Path:
    """A private copy, with a sentinel folder `outside/` beside it holding a secret and copies of the graphs."""
    root = Path(shutil.copytree(engine_artifact, tmp_path / "artifact"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    for name in ("b0.onnx", "b1.onnx", "weights.bin"):
        shutil.copy(root / "onnx" / name, outside / name)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, data) -> None:
    (root / "manifest.json").write_text(json.dumps(data, indent=2))


def digest(root: Path) -> dict[str, str]:
    """Every file's sha256, except the lock file (it holds the last writer's PID)."""
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".shiva.lock"}


def run_verb(verb: str, root: Path, capsys) -> tuple[int, str]:
    code = main(VERBS[verb](root))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def from_artifacts(root: Path, backend: str = "onnxruntime"):
    from shiva_export.runtime import ShivaEngineTransformer

    return ShivaEngineTransformer.from_artifacts(root, backend=backend)


# ----------------------------------------------------------------------------------------------- forgeries
def _set_file(root: Path, stage: str, index: int, path: str, digest_of: Path | None = None) -> None:
    data = manifest(root)
    entry = data["stages"][stage]["files"][index]
    entry["path"] = path
    if digest_of is not None:
        entry["sha256"] = sha(digest_of)
    write_manifest(root, data)


def _graph_to(root: Path, name: str, digest_of: Path) -> None:
    """Point bucket 0's record (and its files entry) at `name`, with that file's correct sha256."""
    data = manifest(root)
    export = data["stages"]["export"]
    old = f"onnx/{export['graphs'][0]['file']}"
    export["graphs"][0]["file"] = name
    export["graphs"][0]["sha256"] = sha(digest_of)
    for entry in export["files"]:
        if entry["path"] == old:
            entry["path"], entry["sha256"] = f"onnx/{name}", sha(digest_of)
    write_manifest(root, data)


def _rerecord(root: Path) -> None:
    """Re-hash every recorded file and graph, as a forger who edits files and then fixes the manifest would."""
    data = manifest(root)
    for record in data["stages"].values():
        for entry in record.get("files", []):
            path = root / entry["path"]
            if path.is_file():
                entry["sha256"] = sha(path)
    export = data["stages"]["export"]
    for graph in export["graphs"]:
        graph["sha256"] = sha(root / "onnx" / graph["file"])
        graph["debug_sha256"] = sha(root / "onnx" / graph["debug_file"])
    export["dense"]["sha256"] = sha(root / "onnx" / export["dense"]["file"])
    write_manifest(root, data)


def _rewrite_sidecar(root: Path, bucket: int, **fields) -> None:
    path = root / "onnx" / "engines" / "ort" / f"b{bucket}.onnxref.meta.json"
    data = json.loads(path.read_text())
    data.update(fields)
    data["engine_sha256"] = sha(root / "onnx" / "engines" / "ort" / f"b{bucket}.onnxref")
    path.write_text(json.dumps(data))


def _link(root: Path, bucket: int, target: str, fix_sidecar: bool = True) -> None:
    link = root / "onnx" / "engines" / "ort" / f"b{bucket}.onnxref"
    link.write_text(json.dumps({"schema": 1, "onnx": target}))
    if fix_sidecar:
        _rewrite_sidecar(root, bucket)
    _rerecord(root)


def _external_location(root: Path, location: str) -> None:
    path = root / "onnx" / "b0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    _rerecord(root)


def _symlink_graph(root: Path) -> None:
    (root / "onnx" / "b0.onnx").unlink()
    (root / "onnx" / "b0.onnx").symlink_to(root.parent / "outside" / "b0.onnx")


def _symlink_onnx_folder(root: Path) -> None:
    target = root.parent / "outside" / "onnx"
    shutil.move(str(root / "onnx"), str(target))
    (root / "onnx").symlink_to(target)


def _symlink_manifest(root: Path) -> None:
    target = root.parent / "outside" / "manifest.json"
    shutil.move(str(root / "manifest.json"), str(target))
    (root / "manifest.json").symlink_to(target)


def _flip_weights_byte(root: Path) -> None:
    path = root / "onnx" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_graph(root: Path) -> None:
    path = root / "onnx" / "b1.onnx"
    path.write_bytes(path.read_bytes()[:100])


def _forged_schedule_k0(root: Path) -> None:
    """k = 0 in bucket 0, the schedule's own hash recomputed; the manifest still has the old sha256."""
    from shiva_export.io import sha256_json

    path = root / "schedule.json"
    data = json.loads(path.read_text())
    data["buckets"][0]["k"] = [0] * len(data["buckets"][0]["k"])
    data["schedule_hash"] = sha256_json({k: v for k, v in data.items() if k != "schedule_hash"})
    path.write_text(json.dumps(data))


def _forged_schedule_k0_rerecorded(root: Path) -> None:
    _forged_schedule_k0(root)
    _rerecord(root)


def _journal_outside(root: Path) -> None:
    """A write journal from a dead process that would 'roll back' by deleting a file outside the folder."""
    (root / ".shiva-journal.json").write_text(json.dumps(
        {"pid": 2 ** 22 + 12345, "manifest_sha256": None,
         "entries": [{"dest": "../outside/secret.txt", "backup": None}]}))


FORGERIES = {
    # paths that lead outside the folder, with correct sha256s
    "file-parent-path": lambda r: _set_file(r, "freeze", 0, "../outside/secret.txt", r.parent / "outside/secret.txt"),
    "file-absolute-path": lambda r: _set_file(r, "freeze", 0, str(r.parent / "outside/secret.txt"),
                                              r.parent / "outside/secret.txt"),
    "file-etc-passwd": lambda r: _set_file(r, "freeze", 0, "../../../../../../../../etc/passwd"),
    "graph-outside": lambda r: _graph_to(r, "../../outside/b0.onnx", r.parent / "outside/b0.onnx"),
    "graph-absolute": lambda r: _graph_to(r, str(r.parent / "outside/b0.onnx"), r.parent / "outside/b0.onnx"),
    "engine-record-outside": lambda r: _set_engine(r, "../outside/secret.txt"),
    "graph-symlink-outside": _symlink_graph,
    "onnx-folder-symlink-outside": _symlink_onnx_folder,
    "manifest-symlink-outside": _symlink_manifest,
    "ort-link-outside": lambda r: _link(r, 0, "../../../../outside/b0.onnx"),
    "weights-location-outside": lambda r: _external_location(r, "../../outside/weights.bin"),
    "journal-outside": _journal_outside,
    # graphs that do not match their record
    "graph-is-dense": lambda r: _graph_to(r, "dense.onnx", r / "onnx/dense.onnx"),
    "graph-is-other-bucket": lambda r: _graph_to(r, "b1.onnx", r / "onnx/b1.onnx"),
    "ort-link-other-bucket": lambda r: _link(r, 0, "../../b1.onnx"),
    "ort-link-unfixed-sidecar": lambda r: _link(r, 0, "../../b1.onnx", fix_sidecar=False),
    "sidecar-onnx-sha": lambda r: (_rewrite_sidecar(r, 0, onnx_sha256="0" * 64), _rerecord(r)),
    "sidecar-weights-sha": lambda r: (_rewrite_sidecar(r, 1, weights_sha256={"weights.bin": "1" * 64}), _rerecord(r)),
    "weights-flipped-byte": _flip_weights_byte,
    "graph-truncated": _truncate_graph,
    "schedule-k0": _forged_schedule_k0,
    "schedule-k0-rerecorded": _forged_schedule_k0_rerecorded,
}


def _set_engine(root: Path, path: str) -> None:
    data = manifest(root)
    data["stages"]["engine"]["engines"]["ort"][0]["engine"] = path
    write_manifest(root, data)


ENGINE_LEVEL = ("ort-link", "sidecar-")  # cases in the ORT engine links and their sidecars


def check_outcome(verb: str, case: str, root: Path, capsys) -> str:
    """`engine` rebuilds a forged or damaged engine (exit 0, the folder inspects clean after); `bench` times the
    exported graphs and never reads the ORT links (exit 0); everything else is refused in one line (exit 2)."""
    code, err = run_verb(verb, root, capsys)
    if case.startswith(ENGINE_LEVEL) and verb in ("engine", "bench"):
        assert code == 0 and "Traceback" not in err, err[-3000:]
        if verb == "engine":
            assert main(["inspect", "--out", str(root)]) == 0, capsys.readouterr()
        return err
    assert_one_line_error(code, err)
    return err


@pytest.mark.parametrize("verb", [*VERBS, "from_artifacts"])
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_or_corrupted_folder_is_refused_in_one_line_and_nothing_outside_is_read(folder, forgery, verb,
                                                                                       capsys):
    FORGERIES[forgery](folder)
    secret = folder.parent / "outside" / "secret.txt"
    with Watch(folder.parent / "outside") as reads:
        if verb == "from_artifacts":
            backend = "ort" if forgery.startswith(("ort-", "sidecar-", "engine-")) else "onnxruntime"
            with pytest.raises(ShivaError) as caught:
                from_artifacts(folder, backend)
            message = str(caught.value)
            assert "\n" not in message, message
        else:
            check_outcome(verb, forgery, folder, capsys)
    passwd_reads = [r for r in reads if r == "/etc/passwd"]
    assert not passwd_reads, "opened /etc/passwd"
    allowed = {str((folder.parent / "outside" / "manifest.json").resolve())} if forgery == "manifest-symlink-outside" \
        else set()
    assert not [r for r in reads if r not in allowed], reads
    assert secret.read_text() == "secret\n"


# ----------------------------------------------------------------------------------------------- malformed JSON
def _manifest_case(edit):
    """`edit` changes the manifest in place (returns None) or returns a replacement, wrapped in a 1-tuple."""
    def apply(root: Path) -> None:
        data = manifest(root)
        replaced = edit(data)
        write_manifest(root, data if replaced is None else replaced[0])
    return apply


def _drop(key_path: list):
    def edit(data):
        target = data
        for key in key_path[:-1]:
            target = target[key]
        del target[key_path[-1]]
    return edit


def _put(key_path: list, value):
    def edit(data):
        target = data
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
    return edit


MALFORMED_MANIFESTS = {
    "a-list": lambda data: ([data],),
    "a-string": lambda data: ("manifest",),
    "null": lambda data: (None,),
    "no-stages": _drop(["stages"]),
    "stages-a-list": _put(["stages"], []),
    "files-a-string": _put(["stages", "export", "files"], "onnx/b0.onnx"),
    "file-entry-no-sha": _drop(["stages", "export", "files", 0, "sha256"]),
    "file-sha-not-hex": _put(["stages", "export", "files", 0, "sha256"], "z" * 64),
    "unknown-config-key": _put(["config", "colour"], "blue"),
    "steps-six": _put(["config", "steps"], "six"),
    "steps-zero": _put(["config", "steps"], 0),
    "shift-nan": _put(["config", "shift"], float("nan")),
    "dtype-fp8": _put(["config", "dtype"], "fp8"),
    "target-keep-2": _put(["config", "target_keep"], 2.0),
    "graph-without-k": _drop(["stages", "export", "graphs", 0, "k"]),
    "graph-k-strings": _put(["stages", "export", "graphs", 0, "k"], ["a", "b"]),
    "graph-bucket-negative": _put(["stages", "export", "graphs", 0, "bucket"], -1),
    "graphs-empty": _put(["stages", "export", "graphs"], []),
    "dense-a-string": _put(["stages", "export", "dense"], "dense.onnx"),
    "engines-unknown-backend": _put(["stages", "engine", "engines", "vulkan"], []),
    "engine-record-without-path": _drop(["stages", "engine", "engines", "ort", 0, "engine"]),
    "freeze-buckets-a-number": _put(["stages", "freeze", "buckets"], 3),
    "schema-other": _put(["schema"], "shiva.manifest/99"),
}


def _nested(root: Path) -> None:
    (root / "manifest.json").write_text("[" * 100000 + "]" * 100000)


MALFORMED = {
    **{f"manifest-{name}": _manifest_case(edit) for name, edit in MALFORMED_MANIFESTS.items()},
    "manifest-not-json": lambda r: (r / "manifest.json").write_text("{not json"),
    "manifest-empty": lambda r: (r / "manifest.json").write_text(""),
    "manifest-binary": lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
    "manifest-deeply-nested": _nested,
    "sidecar-not-json": lambda r: ((r / "onnx/engines/ort/b0.onnxref.meta.json").write_text("{"), _rerecord(r)),
    "sidecar-a-list": lambda r: ((r / "onnx/engines/ort/b0.onnxref.meta.json").write_text("[]"), _rerecord(r)),
    "sidecar-missing-fields": lambda r: ((r / "onnx/engines/ort/b0.onnxref.meta.json").write_text('{"schema": 1}'),
                                         _rerecord(r)),
    "ort-link-not-json": lambda r: ((r / "onnx/engines/ort/b0.onnxref").write_text("nope"),
                                    _rewrite_sidecar(r, 0), _rerecord(r)),
    "ort-link-no-onnx-key": lambda r: ((r / "onnx/engines/ort/b0.onnxref").write_text('{"schema": 1}'),
                                       _rewrite_sidecar(r, 0), _rerecord(r)),
    "schedule-not-json": lambda r: ((r / "schedule.json").write_text("{"), _rerecord(r)),
    "schedule-a-list": lambda r: ((r / "schedule.json").write_text("[1, 2]"), _rerecord(r)),
    "journal-not-json": lambda r: (r / ".shiva-journal.json").write_text("{"),
}


# Every verb loads the manifest through the one Manifest.load: the shapes the issue names run against all five
# targets, the other manifest shapes against the two readers (inspect, the runtime); every other file against all.
ALL_TARGETS = (*VERBS, "from_artifacts")
EVERY_TARGET = {"manifest-a-list", "manifest-no-stages", "manifest-files-a-string", "manifest-unknown-config-key",
                "manifest-steps-six", "manifest-graph-without-k"}
MALFORMED_CASES = [(case, verb) for case in MALFORMED
                   for verb in (ALL_TARGETS if not case.startswith("manifest-") or case in EVERY_TARGET
                                else ("inspect", "from_artifacts"))]


@pytest.mark.parametrize("case, verb", MALFORMED_CASES)
def test_malformed_file_is_a_one_line_error_naming_the_file(folder, case, verb, capsys):
    MALFORMED[case](folder)
    if verb == "from_artifacts":
        backend = "ort" if case.startswith(("sidecar-", "ort-")) else "onnxruntime"
        with pytest.raises(ShivaError) as caught:
            from_artifacts(folder, backend)
        assert "\n" not in str(caught.value)
        return
    err = check_outcome(verb, case, folder, capsys)
    if case.startswith("manifest-"):
        assert "manifest.json" in err, err


# ----------------------------------------------------------------------------------------------- the verdict
def test_inspect_and_the_runtime_agree_on_an_intact_folder(folder, capsys):
    assert main(["inspect", "--out", str(folder)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "runtime: loads" in out
    for backend in ("onnxruntime", "ort"):
        from_artifacts(folder, backend).close()


# ----------------------------------------------------------------------------------------------- locks, kills
def shiva(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shiva_export", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = HANG_GUARD_S) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"hang guard: {what} did not happen")


def holds_lock(root: Path, pid: int) -> bool:
    """Whether process `pid` holds the folder's lock (the kernel's lock table)."""
    lock = root / ".shiva.lock"
    if not lock.is_file():
        return False
    inode = str(lock.stat().st_ino)
    with open("/proc/locks") as table:
        return any(f" {pid} " in line and line.split()[-3].endswith(f":{inode}") for line in table)


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


CLI_EXPORT = ("--target-keep", "0.5", "--steps", "4", "--buckets", "1")


def test_a_second_writer_is_refused_naming_the_pid_of_the_first(folder):
    first = shiva("export", "--out", str(folder), "--force", *CLI_EXPORT)   # one bucket: three graphs, not five
    try:
        wait_for(lambda: holds_lock(folder, first.pid), first, "the first export took the lock")
        second = subprocess.run([sys.executable, "-m", "shiva_export", "engine", "--backend", "ort", "--out",
                                 str(folder)], capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert_one_line_error(second.returncode, second.stderr, f"folder in use by PID {first.pid}")
    finally:
        _, err = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 0, err[-3000:]
    assert main(["inspect", "--out", str(folder)]) == 0


def test_two_builds_at_once_into_a_new_folder_one_runs_one_is_refused(tmp_path):
    out = tmp_path / "new"
    first = shiva("build", "--out", str(out), "--target-keep", "0.5", "--steps", "4", "--buckets", "1",
                  "--backend", "onnxruntime", "--runs", "1")
    try:
        wait_for(lambda: holds_lock(out, first.pid), first, "the first build took the lock")
        second = subprocess.run([sys.executable, "-m", "shiva_export", "build", "--out", str(out), "--target-keep",
                                 "0.5", "--steps", "4", "--buckets", "1", "--backend", "onnxruntime", "--runs", "1"],
                                capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert_one_line_error(second.returncode, second.stderr, f"folder in use by PID {first.pid}")
    finally:
        _, err = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode in (0, 1), err[-3000:]
    assert subprocess.run([sys.executable, "-m", "shiva_export", "inspect", "--out", str(out)],
                          capture_output=True, timeout=HANG_GUARD_S).returncode == 0


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> Path:
    """A folder exported by the CLI itself, so `export --force` with the same options repeats the same inputs."""
    root = tmp_path_factory.mktemp("cli") / "artifact"
    assert main(["export", "--out", str(root), *CLI_EXPORT]) == 0
    return root


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_export_killed_while_writing_a_graph_leaves_the_folder_as_it_was(cli_export, tmp_path, sig):
    folder = Path(shutil.copytree(cli_export, tmp_path / "artifact"))
    before = digest(folder)
    proc = shiva("export", "--out", str(folder), "--force", *CLI_EXPORT)
    wait_for(lambda: any((p / "b0.onnx").exists() for p in folder.glob(".onnx.partial-*")), proc,
             "the export wrote its first graph")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
        assert not partials(folder)
    else:
        assert partials(folder)                # what SIGKILL leaves: the half-written graphs folder
    kept = {k: v for k, v in digest(folder).items() if ".partial-" not in k}
    assert kept == before                      # manifest, schedule, graphs and engines exactly as they were
    assert main(["inspect", "--out", str(folder)]) == 0
    from_artifacts(folder).close()
    # the next writer removes what a killed one left, and its rerun works
    assert main(["engine", "--backend", "ort", "--out", str(folder)]) == 0
    assert not partials(folder)
    assert main(["inspect", "--out", str(folder)]) == 0


def run_until_killed(script: str, folder: Path) -> None:
    """Run `script` (argv[1] = the folder) in a fresh interpreter that must end by its own SIGKILL."""
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_kill_between_a_stage_replacing_its_files_and_committing_is_rolled_back(folder):
    """A process replaces schedule.json inside a stage transaction and dies before the manifest is saved."""
    before = digest(folder)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from shiva_export.pipeline import Workspace\n"
        "from shiva_export.io import write_json\n"
        "ws = Workspace(sys.argv[1])\n"
        "with ws.manifest.writing():\n"
        "    write_json(ws.path('schedule.json'), {'forged': True})\n"
        "    write_json(ws.path('new-file.json'), {'new': True})\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run_until_killed(script, folder)
    assert (folder / ".shiva-journal.json").is_file()
    assert json.loads((folder / "schedule.json").read_text()) == {"forged": True}
    assert main(["inspect", "--out", str(folder)]) == 0   # the reader rolls the dead writer's stage back first
    assert digest(folder) == before
    assert not partials(folder) and not (folder / ".shiva-journal.json").exists()


def test_kill_after_the_commit_keeps_the_new_stage(folder):
    script = (
        "import os, signal, sys\n"
        "from shiva_export.pipeline import Workspace\n"
        "from shiva_export.io import write_json\n"
        "from shiva_export.artifact import Transaction\n"
        "from shiva_export.records import LintRecord\n"
        "Transaction.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "ws = Workspace(sys.argv[1])\n"
        "with ws.manifest.writing():\n"
        "    path = write_json(ws.path('lint.json'), {'new': True})\n"
        "    ws.manifest.set_stage(LintRecord(files=(ws.manifest.file_record(path),), errors=0, warnings=0,\n"
        "                                     passed=True), None)\n"
        "    ws.manifest.save()\n")
    run_until_killed(script, folder)
    assert main(["inspect", "--out", str(folder)]) == 0
    assert json.loads((folder / "lint.json").read_text()) == {"new": True}
    assert manifest(folder)["stages"]["lint"]["passed"] is True
    assert not partials(folder) and not (folder / ".shiva-journal.json").exists()


def test_stale_partials_of_dead_processes_are_removed_by_the_next_writer(folder):
    dead = 2 ** 22 + 4321
    (folder / f".onnx.partial-{dead}").mkdir()
    (folder / f".onnx.partial-{dead}" / "b0.onnx").write_bytes(b"x" * 1000)
    (folder / "check").mkdir(exist_ok=True)
    (folder / f".check.partial-{dead}").mkdir()
    (folder / f".report.partial-{dead}").mkdir()
    (folder / f".check.json.partial-{dead}").write_text("{}")
    assert main(["engine", "--backend", "ort", "--out", str(folder)]) == 0
    assert not partials(folder)


def test_build_killed_during_engines_recovers_on_rerun(folder, tmp_path):
    """Kill the TensorRT-RTX engine stage while it builds plans, then rerun it."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (a test extra) for a multi-second build")
    before = digest(folder)
    proc = shiva("engine", "--backend", "tensorrt-rtx", "--out", str(folder))
    plans = folder / "onnx" / "engines" / "trt-rtx"
    wait_for(lambda: (plans / "b0.plan").is_file(), proc, "the first plan was written")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG_GUARD_S)
    assert main(["inspect", "--out", str(folder)]) == 0
    assert digest(folder) == before
    assert main(["engine", "--backend", "tensorrt-rtx", "--out", str(folder)]) == 0
    assert main(["inspect", "--out", str(folder)]) == 0
    assert not partials(folder)


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args, needle", [
    (["--align", "0"], "--align"),
    (["--buckets", "0"], "--buckets"),
    (["--steps", "-1"], "--steps"),
    (["--target-keep", "1.5"], "target keep"),
    (["--height", "250"], "not divisible"),
    (["--dtype", "fp8"], "dtype"),
])
def test_a_rejected_argument_leaves_no_folder_behind(tmp_path, capsys, args, needle):
    out = tmp_path / "new" / "artifacts"
    code = main(["freeze", "--out", str(out), "--target-keep", "0.5", *args] if "--target-keep" not in args
                else ["freeze", "--out", str(out), *args])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "new").exists()
