#!/usr/bin/env python3
"""vhostkit as others get it: the installed library, the Debian packages, the example
device built out of tree. One subcommand per ctest test (tests/package/CMakeLists.txt,
label "package"); fixtures order them: install -> headers, example-*; deb-build ->
deb-install.

  install            cmake --install into <work>/prefix (from scratch)
  headers            every installed header compiles alone against the prefix, using
                     only installed vhostkit headers; no internal header is installed
  symbols            libvhostkit.so exports the public surface and nothing internal
  example-cmake      examples/vhostkit-rng with find_package(vhostkit 0.2), shared and
                     static; the version file refuses 0.1 and 0.3
  example-pkgconfig  examples/vhostkit-rng with its Makefile and vhostkit.pc
  deb-build          cpack -G DEB: the three packages, their fields and contents
  deb-install        dpkg -i into a clean root, run the daemons, build the example
                     against the installed -dev package, dpkg -r
Python 3 stdlib only.
"""
import argparse
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

VERSION = "0.2.0"
SOVERSION = "0"
failures = []


def check(ok, what):
    print(("PASS: " if ok else "FAIL: ") + what)
    if not ok:
        failures.append(what)
    return ok


def run(cmd, env=None, cwd=None, timeout=600):
    """Runs cmd; returns (exit code, stdout + stderr). Prints the command."""
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=env, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout


def must(cmd, what, **kw):
    rc, out = run(cmd, **kw)
    if rc != 0:
        print(out[-4000:])
    check(rc == 0, what)
    return out


def multiarch():
    return subprocess.run(["gcc", "-print-multiarch"], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()


def deb_arch():
    return subprocess.run(["dpkg", "--print-architecture"], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()


def prefix_of(a):
    return os.path.join(a.work_dir, "prefix")


# Headers a device author needs (docs/api.md) and headers that must stay private.
PUBLIC_HEADERS = [
    "vhostkit/export.h", "vhostkit/version.h", "vhostkit/types.h", "vhostkit/unique_fd.h",
    "vhostkit/log.h", "vhostkit/memory.h", "vhostkit/iotlb.h", "vhostkit/dirty_log.h",
    "vhostkit/translate.h", "vhostkit/virtio_spec.h", "vhostkit/virtqueue.h",
    "vhostkit/vhost_user/device.h", "vhostkit/vhost_user/device_state.h",
    "vhostkit/vhost_user/backend_server.h",
]
PRIVATE_HEADERS = [
    "vhostkit/vhost_user/message.h",
    "vhostkit/vhost_user/socket.h", "vhostkit/vhost_user/queue_runner.h",
    "vhostkit/detail", "vhostkit/frontend", "vhostkit/devices",
]


def cmd_install(a):
    prefix = prefix_of(a)
    shutil.rmtree(prefix, ignore_errors=True)
    must(["cmake", "--install", a.build_dir, "--prefix", prefix], "cmake --install succeeds")
    lib = os.path.join(prefix, "lib", multiarch())
    for f in (f"libvhostkit.so.{VERSION}", f"libvhostkit.so.{SOVERSION}", "libvhostkit.so",
              "libvhostkit.a", "pkgconfig/vhostkit.pc", "cmake/vhostkit/vhostkitConfig.cmake",
              "cmake/vhostkit/vhostkitConfigVersion.cmake",
              "cmake/vhostkit/vhostkit-targets.cmake"):
        check(os.path.exists(os.path.join(lib, f)), f"installed lib/<triplet>/{f}")
    check(os.readlink(os.path.join(lib, "libvhostkit.so")) == f"libvhostkit.so.{SOVERSION}",
          "libvhostkit.so links to the SONAME")
    rc, out = run(["readelf", "-d", os.path.join(lib, f"libvhostkit.so.{VERSION}")])
    check(f"Library soname: [libvhostkit.so.{SOVERSION}]" in out, "SONAME libvhostkit.so.0")
    for f in ("bin/vhostkit-net", "bin/vhostkit-blk", "share/man/man1/vhostkit-net.1.gz",
              "share/man/man1/vhostkit-blk.1.gz"):
        check(os.path.exists(os.path.join(prefix, f)), f"installed {f}")
    for name in ("net", "blk"):
        path = os.path.join(prefix, "share/qemu/vhost-user", f"50-vhostkit-{name}.json")
        with open(path) as f:
            d = json.load(f)
        check(d.get("binary") == os.path.join(prefix, "bin", f"vhostkit-{name}"),
              f"50-vhostkit-{name}.json names the installed daemon ({d.get('binary')})")
    with open(os.path.join(lib, "pkgconfig/vhostkit.pc")) as f:
        pc = f.read()
    check(f"prefix={prefix}\n" in pc, "vhostkit.pc carries the install prefix")
    units = os.path.join(prefix, "lib/systemd/system")
    with open(os.path.join(units, "vhostkit-blk@.service")) as f:
        check(f"ExecStart={prefix}/bin/vhostkit-blk --fd 3" in f.read(),
              "vhostkit-blk@.service starts the installed daemon with --fd 3")


def cmd_headers(a):
    prefix = prefix_of(a)
    inc = os.path.join(prefix, "include")
    installed = sorted(os.path.relpath(p, inc)
                       for p in glob.glob(os.path.join(inc, "vhostkit", "**", "*.h"), recursive=True))
    print("installed headers: " + " ".join(installed))
    for h in PUBLIC_HEADERS:
        check(h in installed, f"{h} is installed")
    for h in PRIVATE_HEADERS:
        check(not any(i == h or i.startswith(h + "/") for i in installed),
              f"{h} is not installed")
    work = os.path.join(a.work_dir, "headers")
    os.makedirs(work, exist_ok=True)
    for h in installed:
        src = os.path.join(work, h.replace("/", "_") + ".cpp")
        with open(src, "w") as f:
            f.write(f"#include <{h}>\n#include <{h}>  // and twice: include guards\n")
        # -MM lists every header the translation unit read: each vhostkit one must come
        # from the prefix (not from the source tree, not from another installation).
        rc, out = run(["g++", "-std=c++20", "-Wall", "-Wextra", "-Wpedantic", "-Werror",
                       "-I", inc, "-fsyntax-only", "-M", src])
        deps = out.replace("\\\n", " ").split()
        foreign = [d for d in deps if "/vhostkit/" in d and not d.startswith(inc + "/")]
        if rc != 0:
            print(out[-3000:])
        check(rc == 0 and not foreign,
              f"<{h}> compiles alone with only installed headers"
              + (f" (used {foreign})" if foreign else ""))


# The public surface: symbols a device author's program links against (docs/api.md).
REQUIRED_SYMBOLS = [
    "vhostkit::BackendServer::BackendServer(", "vhostkit::BackendServer::~BackendServer()",
    "vhostkit::BackendServer::listen_unix(", "vhostkit::BackendServer::run(int)",
    "vhostkit::BackendServer::serve(", "vhostkit::BackendServer::stop()",
    "vhostkit::Virtqueue::pop(", "vhostkit::Virtqueue::push(", "vhostkit::Virtqueue::write_chain(",
    "vhostkit::Virtqueue::read_chain(", "vhostkit::VirtqueueError::message() const",
    "vhostkit::to_string(vhostkit::VirtqueueErrc)", "vhostkit::Translator::translate_slow(",
    "vhostkit::Translator::log_range(", "vhostkit::AddressSpace::AddressSpace(",
    "vhostkit::MemoryTable::MemoryTable(", "vhostkit::DeviceIotlb::DeviceIotlb(",
    "vhostkit::DirtyLog::map(", "vhostkit::TranslateError::message() const",
    "vhostkit::set_log_sink(", "vhostkit::log_line(", "vhostkit::log_enabled(",
    "vhostkit::to_string(vhostkit::LogLevel)", "vhostkit::DeviceStateWriter::u64(",
    "vhostkit::DeviceStateReader::u64(", "vhostkit::DeviceStateError::message() const",
]
# Internal names: the vhost-user codec, the queue workers, details.
FORBIDDEN = re.compile(r"vhostkit::(vhost_user|detail|internal|frontend)::|QueueRunner|"
                       r"QueueWorker|::Impl::|vhostkit::.*::(encode|decode)")


def cmd_symbols(a):
    rc, out = run(["nm", "-D", "--defined-only", "-C", a.library])
    check(rc == 0, "nm reads the library")
    symbols = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            # Names as written in the headers: without GCC's ABI tags.
            symbols.append((parts[1], parts[2].replace("[abi:cxx11]", "")))
    print(f"{len(symbols)} exported symbols")
    for req in REQUIRED_SYMBOLS:
        check(any(s.startswith(req) for _, s in symbols), f"exports {req}")
    internal = [s for _, s in symbols if FORBIDDEN.search(s)]
    check(not internal, "exports nothing internal" + (f": {internal[:10]}" if internal else ""))
    # Anything else strong (not a weak template instantiation of the standard library)
    # would be a symbol of ours outside the vhostkit namespace.
    stray = [s for t, s in symbols
             if not re.match(r"(typeinfo |typeinfo name |vtable )?(for )?vhostkit::", s)
             and t not in ("W", "V", "u")]
    check(not stray, "every strong exported symbol is in namespace vhostkit"
          + (f": {stray[:10]}" if stray else ""))


def build_example_cmake(a, prefix_path, build, extra=(), env=None):
    shutil.rmtree(build, ignore_errors=True)
    src = os.path.join(a.source_dir, "examples", "vhostkit-rng")
    must(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
          f"-DCMAKE_PREFIX_PATH={prefix_path}", *extra], f"configure the example ({build})", env=env)
    must(["cmake", "--build", build], f"build the example ({build})", env=env)
    return os.path.join(build, "vhostkit-rng")


def check_rng_binary(binary, env=None, shared=True, libdir=None):
    rc, out = run([binary, "--print-capabilities"], env=env)
    try:
        caps = json.loads(out) if rc == 0 else None
    except ValueError:
        caps = None
    check(caps == {"type": "rng"}, f"{binary} --print-capabilities prints the rng type")
    rc, out = run([binary, "--version"], env=env)
    check(rc == 0 and VERSION in out, f"{binary} --version ({out.strip()})")
    rc, out = run(["readelf", "-d", binary])
    needs = f"[libvhostkit.so.{SOVERSION}]" in out
    check(needs == shared, f"{binary} {'links' if shared else 'does not link'} "
          f"libvhostkit.so.{SOVERSION}")
    if shared and libdir:
        rc, out = run(["ldd", binary], env=env)
        check(re.search(r"libvhostkit\.so\.0 => " + re.escape(libdir), out) is not None,
              f"{binary} loads libvhostkit.so.0 from {libdir}")


def check_version_file(a, prefix_path):
    """find_package(vhostkit <v>) against the installed config: 0.2 yes, 0.1 and 0.3 no."""
    probe = os.path.join(a.work_dir, "version-probe")
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "CMakeLists.txt"), "w") as f:
        f.write("cmake_minimum_required(VERSION 3.25)\nproject(probe LANGUAGES CXX)\n"
                "find_package(vhostkit ${WANT} QUIET)\n"
                "message(STATUS \"PROBE found=${vhostkit_FOUND} version=${vhostkit_VERSION}\")\n")
    for want, ok in (("0.2", True), ("0.2.0", True), ("0.1", False), ("0.3", False),
                     ("1.0", False)):
        b = os.path.join(probe, "build-" + want)
        shutil.rmtree(b, ignore_errors=True)
        rc, out = run(["cmake", "-S", probe, "-B", b, f"-DWANT={want}",
                       f"-DCMAKE_PREFIX_PATH={prefix_path}"])
        found = "PROBE found=1" in out
        check(rc == 0 and found == ok,
              f"find_package(vhostkit {want}) {'finds' if ok else 'refuses'} {VERSION}")


def cmd_example_cmake(a):
    prefix = prefix_of(a)
    libdir = os.path.join(prefix, "lib", multiarch())
    binary = build_example_cmake(a, prefix, os.path.join(a.work_dir, "rng-cmake"))
    check_rng_binary(binary, libdir=libdir)
    static = build_example_cmake(a, prefix, os.path.join(a.work_dir, "rng-cmake-static"),
                                 ["-DVHOSTKIT_RNG_STATIC=ON"])
    check_rng_binary(static, shared=False)
    check_version_file(a, prefix)


def build_example_make(a, work, pkg_env):
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(os.path.join(a.source_dir, "examples", "vhostkit-rng"), work)
    must(["make", "-C", work, "-j2"], f"make builds the example with pkg-config ({work})",
         env=pkg_env)
    return os.path.join(work, "vhostkit-rng")


def cmd_example_pkgconfig(a):
    prefix = prefix_of(a)
    libdir = os.path.join(prefix, "lib", multiarch())
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(libdir, "pkgconfig"))
    rc, out = run(["pkg-config", "--modversion", "vhostkit"], env=env)
    check(out.strip() == VERSION, f"pkg-config --modversion vhostkit is {VERSION}")
    rc, out = run(["pkg-config", "--cflags", "--libs", "vhostkit"], env=env)
    check(f"-I{prefix}/include" in out and f"-L{libdir}" in out and "-lvhostkit" in out
          and "-lfmt" in out, f"pkg-config flags name the prefix and fmt ({out.strip()})")
    rc, out = run(["pkg-config", "--static", "--libs", "vhostkit"], env=env)
    check("-pthread" in out, "pkg-config --static adds Libs.private")
    binary = build_example_make(a, os.path.join(a.work_dir, "rng-make"), env)
    run_env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    check_rng_binary(binary, env=run_env, libdir=libdir)


def deb_names():
    arch = deb_arch()
    return {c: f"{n}_{VERSION}_{arch}.deb" for c, n in
            (("runtime", "vhostkit"), ("library", f"libvhostkit{SOVERSION}"),
             ("development", "libvhostkit-dev"))}


def deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "-f", deb, field], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()


def deb_files(deb):
    out = subprocess.run(["dpkg-deb", "-c", deb], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    return [line.split()[5].lstrip(".") for line in out.splitlines()]


def cmd_deb_build(a):
    out_dir = os.path.join(a.work_dir, "debs")
    shutil.rmtree(out_dir, ignore_errors=True)
    must(["cpack", "-G", "DEB", "-B", out_dir, "--config",
          os.path.join(a.build_dir, "CPackConfig.cmake")], "cpack -G DEB succeeds",
         cwd=a.build_dir)
    names = deb_names()
    for n in names.values():
        check(os.path.exists(os.path.join(out_dir, n)), f"{n} is built")
    if failures:
        return
    runtime, library, dev = (os.path.join(out_dir, names[c])
                             for c in ("runtime", "library", "development"))
    depends = deb_field(runtime, "Depends")
    for dep in ("liburing2", "libfmt9", "libstdc++6", "libc6"):
        check(re.search(r"\b" + re.escape(dep) + r"\b", depends) is not None,
              f"vhostkit Depends on {dep} ({depends})")
    check("libvhostkit0" not in depends, "the daemons do not need libvhostkit0 (static)")
    check(f"libvhostkit{SOVERSION} (= {VERSION})" in deb_field(dev, "Depends"),
          "libvhostkit-dev Depends on the same libvhostkit0")
    lib_depends = deb_field(library, "Depends")
    check("libfmt9" in lib_depends and "liburing" not in lib_depends,
          f"libvhostkit0 Depends on fmt, not liburing ({lib_depends})")
    files = deb_files(runtime)
    for f in ("/usr/bin/vhostkit-net", "/usr/bin/vhostkit-blk",
              "/usr/share/man/man1/vhostkit-net.1.gz", "/usr/share/man/man1/vhostkit-blk.1.gz",
              "/usr/share/qemu/vhost-user/50-vhostkit-net.json",
              "/usr/share/qemu/vhost-user/50-vhostkit-blk.json",
              "/lib/systemd/system/vhostkit-blk@.socket", "/lib/systemd/system/vhostkit-blk@.service",
              "/lib/systemd/system/vhostkit-net@.socket", "/lib/systemd/system/vhostkit-net@.service"):
        check(f in files, f"vhostkit contains {f}")
    check(not any("vhostkit-migrate" in f or "/include/" in f for f in files),
          "vhostkit holds no demo and no headers")
    ma = multiarch()
    files = deb_files(library)
    check(f"/usr/lib/{ma}/libvhostkit.so.{VERSION}" in files
          and f"/usr/lib/{ma}/libvhostkit.so.{SOVERSION}" in files
          and not any(f.endswith("libvhostkit.so") for f in files),
          "libvhostkit0 holds the shared library and its SONAME link only")
    control = os.path.join(a.work_dir, "libvhostkit0-control")
    shutil.rmtree(control, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-e", library, control], check=True)

    def control_file(name):
        path = os.path.join(control, name)
        return open(path).read() if os.path.exists(path) else ""

    check(f"libvhostkit {SOVERSION} libvhostkit{SOVERSION} (>= {VERSION})"
          in control_file("shlibs"), "libvhostkit0 has a shlibs file (>= 0.2.0)")
    check("activate-noawait ldconfig" in control_file("triggers"),
          "libvhostkit0 uses the ldconfig trigger")
    check("ldconfig" not in control_file("postinst").replace("ldconfig trigger", "")
          .replace("ldconfig call", ""), "libvhostkit0's postinst does not call ldconfig")
    files = deb_files(dev)
    for f in (f"/usr/lib/{ma}/libvhostkit.so", f"/usr/lib/{ma}/libvhostkit.a",
              f"/usr/lib/{ma}/pkgconfig/vhostkit.pc", f"/usr/lib/{ma}/cmake/vhostkit/vhostkitConfig.cmake",
              "/usr/include/vhostkit/vhost_user/backend_server.h"):
        check(f in files, f"libvhostkit-dev contains {f}")
    check(not any(h in f for f in files for h in PRIVATE_HEADERS),
          "libvhostkit-dev holds no internal header")


def make_root(root, debs):
    """A clean dpkg root whose status lists, as installed, the host's packages that our
    packages depend on (so dpkg checks the Depends against what this machine has)."""
    shutil.rmtree(root, ignore_errors=True)
    admin = os.path.join(root, "var/lib/dpkg")
    for d in ("info", "updates", "triggers"):
        os.makedirs(os.path.join(admin, d))
    open(os.path.join(admin, "available"), "w").close()
    ours = {deb_field(d, "Package") for d in debs}
    wanted = set()
    for d in debs:
        for alt in deb_field(d, "Depends").split(","):
            name = alt.strip().split(" ")[0].split(":")[0]
            if name and name not in ours:
                wanted.add(name)
    entries = []
    for name in sorted(wanted):
        r = subprocess.run(["dpkg-query", "-s", name], stdout=subprocess.PIPE, text=True)
        if not check(r.returncode == 0, f"dependency {name} is installed on this machine"):
            continue
        entries.append(r.stdout.strip() + "\n")
        arch = re.search(r"^Architecture: (\S+)", r.stdout, re.M).group(1)
        list_name = name + (f":{arch}" if "Multi-Arch: same" in r.stdout else "")
        open(os.path.join(admin, "info", list_name + ".list"), "w").close()
    with open(os.path.join(admin, "status"), "w") as f:
        f.write("\n".join(entries))


def cmd_deb_install(a):
    out_dir = os.path.join(a.work_dir, "debs")
    debs = [os.path.join(out_dir, n) for n in deb_names().values()]
    root = os.path.join(a.work_dir, "deb-root")
    make_root(root, debs)
    # The root has no shell to run maintainer scripts in: run them outside it (libvhostkit0's
    # do nothing; its ldconfig trigger finds no interested package in the root).
    must(["dpkg", f"--root={root}", "--force-script-chrootless", "-i", *debs],
         "dpkg -i installs the three packages into a clean root")
    rc, out = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
                   "${Package} ${Version} ${Status}\n", "vhostkit", "libvhostkit0",
                   "libvhostkit-dev"])
    check(out.count(f"{VERSION} install ok installed") == 3, "dpkg reports all three installed")
    usr = os.path.join(root, "usr")
    rc, out = run([os.path.join(usr, "bin/vhostkit-net"), "--print-capabilities"])
    check(rc == 0 and json.loads(out or "{}").get("type") == "net",
          "the installed vhostkit-net --print-capabilities prints its JSON")
    rc, out = run([os.path.join(usr, "bin/vhostkit-blk"), "--print-capabilities"])
    check(rc == 0 and json.loads(out or "{}").get("type") == "block",
          "the installed vhostkit-blk --print-capabilities prints its JSON")
    for name in ("net", "blk"):
        with open(os.path.join(usr, "share/qemu/vhost-user", f"50-vhostkit-{name}.json")) as f:
            binary = json.load(f)["binary"]
        check(binary == f"/usr/bin/vhostkit-{name}" and os.access(root + binary, os.X_OK),
              f"50-vhostkit-{name}.json names {binary}, which the package installs")
    for name in ("net", "blk"):
        with gzip.open(os.path.join(usr, "share/man/man1", f"vhostkit-{name}.1.gz"), "rt") as f:
            roff = f.read()
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=roff, text=True,
                           stderr=subprocess.PIPE)
        check(r.returncode == 0 and r.stderr == "" and ".SH OPTIONS" in roff,
              f"vhostkit-{name}(1) renders without warnings {r.stderr.strip()[:200]}")
    units = os.path.join(root, "lib/systemd/system")
    with open(os.path.join(units, "vhostkit-blk@.service")) as f:
        service = f.read()
    check("ExecStart=/usr/bin/vhostkit-blk --fd 3 --blk-file ${BLK_FILE} $BLK_OPTIONS" in service
          and "EnvironmentFile=/etc/vhostkit/blk-%i.conf" in service,
          "vhostkit-blk@.service runs /usr/bin/vhostkit-blk --fd 3 with /etc/vhostkit/blk-%i.conf")

    # The example against the installed -dev package, with CMake and with pkg-config.
    libdir = os.path.join(usr, "lib", multiarch())
    binary = build_example_cmake(a, usr, os.path.join(a.work_dir, "rng-deb-cmake"))
    check_rng_binary(binary, libdir=libdir)
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(libdir, "pkgconfig"))
    rc, out = run(["pkg-config", f"--define-variable=prefix={usr}", "--cflags", "--libs",
                   "vhostkit"], env=env)
    check(f"-I{usr}/include" in out, f"vhostkit.pc relocated to the root ({out.strip()})")
    make_env = dict(env, PKG_CONFIG=f"pkg-config --define-variable=prefix={usr}")
    binary = build_example_make(a, os.path.join(a.work_dir, "rng-deb-make"), make_env)
    check_rng_binary(binary, env=dict(os.environ, LD_LIBRARY_PATH=libdir), libdir=libdir)

    must(["dpkg", f"--root={root}", "--force-script-chrootless", "-P", "libvhostkit-dev",
          "libvhostkit0", "vhostkit"], "dpkg -P removes the three packages")
    left = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
            if "/var/lib/dpkg" not in dp]
    check(not left, "nothing is left in the root after removal" + (f": {left[:5]}" if left else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["install", "headers", "symbols", "example-cmake",
                                        "example-pkgconfig", "deb-build", "deb-install"])
    ap.add_argument("--build-dir")
    ap.add_argument("--source-dir")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--library", help="symbols: the shared library")
    a = ap.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    globals()["cmd_" + a.command.replace("-", "_")](a)
    if failures:
        print(f"FAIL: {len(failures)} check(s): " + "; ".join(failures))
        return 1
    print(f"PASS: {a.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
