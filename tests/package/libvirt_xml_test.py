#!/usr/bin/env python3
"""The libvirt domain examples in docs/libvirt/ are valid libvirt XML (virt-xml-validate,
from Debian's libvirt-clients with libxml2-utils, installed here if missing), use shared
memfd memory as vhost-user needs, and name the socket paths the installed systemd socket
units listen on.
A copy with a misspelt device type must fail validation (so the check can fail).

Usage: libvirt_xml_test.py --source-dir DIR --prefix DIR --work-dir DIR
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

failures = []


def check(ok, what):
    print(("PASS: " if ok else "FAIL: ") + what)
    if not ok:
        failures.append(what)


def apt_install(packages):
    """Installs Debian packages, refreshing the package lists first if that is needed."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + packages
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def validate(path):
    r = subprocess.run(["virt-xml-validate", path, "domain"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return r.returncode == 0, r.stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--work-dir", required=True)
    a = ap.parse_args()
    # virt-xml-validate (libvirt-clients) runs xmllint (libxml2-utils).
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        apt_install(["libvirt-clients", "libxml2-utils"])
    os.makedirs(a.work_dir, exist_ok=True)
    sockets = {}
    for kind in ("blk", "net"):
        with open(os.path.join(a.prefix, f"lib/systemd/system/vhostkit-{kind}@.socket")) as f:
            sockets[kind] = re.search(r"^ListenStream=(.*)$", f.read(), re.M).group(1)
    docs = sorted(glob.glob(os.path.join(a.source_dir, "docs/libvirt/*.xml")))
    check(len(docs) >= 1, f"docs/libvirt holds domain examples ({len(docs)})")
    for path in docs:
        name = os.path.basename(path)
        ok, out = validate(path)
        check(ok, f"{name}: {out}")
        dom = ET.parse(path).getroot()
        vm = dom.findtext("name")
        check(dom.find("memoryBacking/source[@type='memfd']") is not None
              and dom.find("memoryBacking/access[@mode='shared']") is not None,
              f"{name}: guest memory is shared memfd")
        disk = dom.find("devices/disk[@type='vhostuser']/source")
        iface = dom.find("devices/interface[@type='vhostuser']/source")
        for kind, src in (("blk", disk), ("net", iface)):
            want = sockets[kind].replace("%i", vm)
            check(src is not None and src.get("path") == want,
                  f"{name}: the {kind} device uses {want}, where vhostkit-{kind}@{vm}.socket "
                  "listens")
        with open(path) as f:
            bad = f.read().replace("type='vhostuser'", "type='vhostusr'", 1)
        bad_path = os.path.join(a.work_dir, "broken-" + name)
        with open(bad_path, "w") as f:
            f.write(bad)
        ok, _ = validate(bad_path)
        check(not ok, f"{name} with a misspelt device type fails validation")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: the libvirt examples validate and match the socket units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
