#!/usr/bin/env python3
"""Builds the libFuzzer targets against the package's own debug build.

The module under test (NBDProtocol or VBDControl) is compiled again from Sources/ -- the same
files, with the flags SwiftPM used for it (read from .build/debug.yaml) -- but optimised and
instrumented with -sanitize=fuzzer,address; the harness is linked with it and with the debug
build's objects for every other module. So `swift build` of the package is untouched (libFuzzer
supplies main, which a SwiftPM product cannot have next to vbdtool), and a fuzz build takes
seconds once `swift build` has run. Outputs go to .build/fuzz/<target>; a target is rebuilt only
when its inputs change.

usage: Fuzz/build.py [--build-dir .build] [target ...]   (default: all targets)
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "Fuzz", "Harness")

# target -> (module under test, harness files)
TARGETS = {
    "nbd-handshake": ("NBDProtocol", ["FuzzSupport.swift", "NBDSessionDriver.swift", "NBDHandshakeTarget.swift"]),
    "nbd-transmission": ("NBDProtocol", ["FuzzSupport.swift", "NBDSessionDriver.swift", "NBDTransmissionTarget.swift"]),
    "control-framing": ("VBDControl", ["FuzzSupport.swift", "ControlFramingTarget.swift"]),
}
SANITIZE = "-sanitize=fuzzer,address"

# Flags of SwiftPM's incremental debug compile that do not apply to a one-shot optimised build;
# the number is how many arguments each takes.
DROPPED = {
    "-emit-dependencies": 0, "-incremental": 0, "-enable-batch-mode": 0, "-serialize-diagnostics": 0,
    "-parseable-output": 0, "-emit-objc-header": 0, "-Onone": 0, "-g": 0, "-DDEBUG": 0, "-c": 0,
    "-output-file-map": 1, "-index-store-path": 1, "-emit-objc-header-path": 1, "-emit-module-path": 1,
    "-module-cache-path": 1,
}


def manifest_args(manifest, key):
    """The args list of command `key` in SwiftPM's llbuild manifest (YAML whose args are JSON)."""
    lines = manifest.split("\n")
    for index, line in enumerate(lines):
        if line.strip() == f'"{key}":':
            for following in lines[index + 1:index + 15]:
                stripped = following.strip()
                if stripped.startswith("args:"):
                    return json.loads(stripped[len("args:"):])
    sys.exit(f"fuzz build: no command {key} in the build manifest; run `swift build` first")


def manifest_inputs(manifest, key):
    lines = manifest.split("\n")
    for index, line in enumerate(lines):
        if line.strip() == f'"{key}":':
            for following in lines[index + 1:index + 6]:
                stripped = following.strip()
                if stripped.startswith("inputs:"):
                    return json.loads(stripped[len("inputs:"):])
    return None


def module_closure(manifest, module, triple):
    """The modules `module` needs at link time: Swift modules by the swiftmodules each compile
    reads, C modules by the module maps each compile is given."""
    seen, pending = set(), [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        key = f"C.{name}-{triple}-debug.module"
        inputs = manifest_inputs(manifest, key)
        if inputs is None:
            continue  # a C module: compiled per file, nothing further to follow
        for path in inputs:
            found = re.search(r"/Modules/([^/]+)\.swiftmodule$", path)
            if found:
                pending.append(found.group(1))
        for flag in manifest_args(manifest, key):
            found = re.search(r"-fmodule-map-file=.*/([^/]+)\.build/module\.modulemap$", flag) \
                or re.search(r"-fmodule-map-file=.*/Sources/([^/]+)/include/module\.modulemap$", flag)
            if found:
                seen.add(found.group(1))
    return seen


def run(command, log):
    started = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The gold linker warns about every ASan check symbol it cannot export: noise, not news.
    output = "\n".join(l for l in result.stdout.splitlines() if "Cannot export local symbol" not in l)
    if result.returncode != 0:
        print(output, file=sys.stderr)
        sys.exit(f"fuzz build: {log} failed (exit {result.returncode})")
    print(f"fuzz build: {log} ({time.monotonic() - started:.1f} s)")


def digest(paths, extra):
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build-dir", default=os.path.join(ROOT, ".build"))
    parser.add_argument("--out-dir", help="default: BUILD_DIR/fuzz")
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    options = parser.parse_args()
    build_dir = os.path.abspath(options.build_dir)
    triple = "x86_64-unknown-linux-gnu"
    debug_dir = os.path.join(build_dir, triple, "debug")
    manifest_path = os.path.join(build_dir, "debug.yaml")
    if not os.path.exists(manifest_path):
        sys.exit("fuzz build: no .build/debug.yaml; run `swift build` first")
    with open(manifest_path) as f:
        manifest = f.read()
    out_root = os.path.abspath(options.out_dir or os.path.join(build_dir, "fuzz"))
    module_cache = os.path.join(out_root, "ModuleCache")

    link_args = manifest_args(manifest, f"C.vbdtool-{triple}-debug.exe")
    libraries = [a for a in link_args if a.startswith("-l") or a.startswith("-L/")]
    with open(os.path.join(debug_dir, "vbdtool.product", "Objects.LinkFileList")) as f:
        # Kept as SwiftPM quoted them (paths with spaces are in quotes): passed on as a response file.
        all_objects = [l.strip() for l in f if l.strip()]

    def compile_module(module, instrumented, include_dirs):
        """Compiles `module` from its sources with the debug build's flags, optimised; with the
        fuzzer and address sanitizer instrumentation when `instrumented`. Returns (dir, object, flags)."""
        module_dir = os.path.join(out_root, "modules", module)
        module_object = os.path.join(module_dir, f"{module}.o")
        args = manifest_args(manifest, f"C.{module}-{triple}-debug.module")
        sources_file = next(a[1:] for a in args if a.startswith("@"))
        with open(sources_file) as f:
            sources = [l.strip().strip('"') for l in f if l.strip()]
        flags, skip, pass_next = [], 0, False
        for a in args[1:]:
            if skip:
                skip -= 1
                continue
            if pass_next:
                flags.append(a)
                pass_next = False
                continue
            if a == "-Xcc":  # its argument belongs to clang, whatever it says
                flags.append(a)
                pass_next = True
                continue
            if a in DROPPED:
                skip = DROPPED[a]
                continue
            if a.startswith("@") or a.startswith("-j"):
                continue
            flags.append(a)
        # Testable so that a harness can reach the internal framing functions the server itself
        # calls (and so that every symbol the debug objects reference is exported).
        command = [args[0]] + [f for d in include_dirs for f in ("-I", d)] + flags + sources + [
            "-O", "-wmo", "-gline-tables-only", "-enable-testing", "-c", "-o", module_object,
            "-emit-module-path", os.path.join(module_dir, f"{module}.swiftmodule"),
            "-module-cache-path", module_cache] + ([SANITIZE] if instrumented else [])
        stamp = os.path.join(module_dir, "stamp")
        # The modules it imports are part of its inputs: a changed VBDCore interface recompiles it.
        imported = [(p, os.path.getmtime(p)) for p in manifest_inputs(manifest, f"C.{module}-{triple}-debug.module") or []
                    if p.endswith(".swiftmodule") and os.path.exists(p)]
        key = digest(sources, command + imported)
        os.makedirs(module_dir, exist_ok=True)
        if not (os.path.exists(stamp) and open(stamp).read() == key and os.path.exists(module_object)):
            run(command, f"{module}" + (f" with {SANITIZE}" if instrumented else " (optimised, not instrumented)"))
            with open(stamp, "w") as f:
                f.write(key)
        return module_dir, module_object, flags

    for target in options.targets:
        if target not in TARGETS:
            sys.exit(f"fuzz build: unknown target {target}; targets: {', '.join(TARGETS)}")
        module, harness_files = TARGETS[target]
        # The debug build's NIOCore is unoptimised: its generic integer packing then dominates a
        # parser run. An optimised (uninstrumented) copy makes the NBD targets several times faster.
        optimised = ["NIOCore"] if module == "NBDProtocol" else []
        optimised_dirs, optimised_objects = [], []
        for dependency in optimised:
            directory, obj, _ = compile_module(dependency, False, [])
            optimised_dirs.append(directory)
            optimised_objects.append(obj)
        module_dir, module_object, flags = compile_module(module, True, optimised_dirs)

        # What vbdtool links of the modules the module under test needs, less its own debug copy.
        needed = module_closure(manifest, module, triple) - {module} - set(optimised)
        objects = [o for o in all_objects
                   if (m := re.search(r"/([^/]+)\.build/", o.strip("'\""))) and m.group(1) in needed]
        target_dir = os.path.join(out_root, target)
        os.makedirs(target_dir, exist_ok=True)
        executable = os.path.join(target_dir, target)
        include_flags = []
        index = 0
        while index < len(flags):
            if flags[index] == "-Xcc" or flags[index] == "-I":
                include_flags += flags[index:index + 2]
                index += 2
                continue
            if flags[index] in ("-swift-version", "-package-name", "-target"):
                include_flags += flags[index:index + 2]
                index += 2
                continue
            index += 1
        harness = [os.path.join(HARNESS, h) for h in harness_files]
        objects_file = os.path.join(target_dir, "objects")
        with open(objects_file, "w") as f:
            f.write("\n".join(objects) + "\n")
        module_name = re.sub(r"[^A-Za-z0-9]", "", target.title())
        command = ["swiftc", "-module-name", module_name, "-parse-as-library", "-O", "-gline-tables-only", SANITIZE,
                   "-I", module_dir] + [f for d in optimised_dirs for f in ("-I", d)] + include_flags + ["-module-cache-path", module_cache] + harness + [
                   module_object] + optimised_objects + ["@" + objects_file] + libraries + ["-o", executable]
        stamp = os.path.join(target_dir, "stamp")
        key = digest(harness + [module_object, objects_file] + optimised_objects, command)
        if os.path.exists(stamp) and open(stamp).read() == key and os.path.exists(executable) \
                and os.path.getmtime(executable) >= max(os.path.getmtime(o.strip("'\"")) for o in objects):
            print(f"fuzz build: {target} is up to date")
            continue
        run(command, f"{target} harness + link")
        with open(stamp, "w") as f:
            f.write(key)


if __name__ == "__main__":
    main()
