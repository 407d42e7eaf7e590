#!/usr/bin/env python3
"""Turns one of vhostkit's man-page Markdown files (docs/vhostkit-*.md) into a roff man
page, gzip-compressed as Debian wants (gzip -9n: no name, no time stamp, so the output is
the same on every build).

It reads the subset of Markdown those pages use: a title "# name(section)", "## SECTION"
and "### Subsection" headings, paragraphs, "- " lists (nested by two spaces), definition
lists ("`term`" then ": definition", continued by lines indented two spaces), code blocks
(fenced with ``` or indented four spaces) and inline `code`, **bold**, *italic* and
[links](target). Sections meant for the source tree's readers (TESTS, BENCHMARKS) are left
out. Anything else is kept as text; nothing is dropped silently.

Usage: md2man.py PAGE.md OUTPUT(.gz) --version VERSION
"""
import argparse
import gzip
import re
import sys

SKIPPED_SECTIONS = {"TESTS", "BENCHMARKS"}


def escape(text):
    """Escapes roff's special characters in plain text."""
    return text.replace("\\", "\\e")


def inline(text):
    """Markdown inline markup to roff font changes."""
    out = []
    pos = 0
    for m in re.finditer(r"`([^`]+)`", text):
        out.append(inline_plain(text[pos:m.start()]))
        out.append("\\fB" + escape(m.group(1)).replace("-", "\\-") + "\\fP")
        pos = m.end()
    out.append(inline_plain(text[pos:]))
    return "".join(out)


def inline_plain(text):
    text = escape(text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\\fI\1\\fR", text)
    return text


def line_out(text):
    """A text line, protected against starting with a roff control character."""
    if text.startswith((".", "'")):
        return "\\&" + text
    return text


class Converter:
    def __init__(self, version):
        self.version = version
        self.out = []
        self.para = []  # pending paragraph lines
        self.list_depth = 0

    def emit(self, *lines):
        self.out.extend(lines)

    def flush_para(self):
        if self.para:
            self.emit(line_out(inline(" ".join(s.strip() for s in self.para))))
            self.para = []

    def close_lists(self, depth=0):
        while self.list_depth > depth:
            self.emit(".RE")
            self.list_depth -= 1

    def code_block(self, lines):
        self.flush_para()
        self.emit(".sp", ".RS 4", ".nf")
        for line in lines:
            self.emit(line_out(escape(line).replace("-", "\\-")))
        self.emit(".fi", ".RE")

    def convert(self, text):
        lines = text.split("\n")
        i = 0
        skipping = False
        title = None
        while i < len(lines):
            line = lines[i]
            m = re.match(r"^# (\S+)\((\d)\)\s*$", line)
            if m and title is None:
                title = (m.group(1), m.group(2))
                self.emit(f'.TH "{m.group(1).upper()}" "{m.group(2)}" "" '
                          f'"vhostkit {self.version}" "vhostkit manual"')
                i += 1
                continue
            m = re.match(r"^(##+) (.*)$", line)
            if m:
                self.flush_para()
                self.close_lists()
                heading = m.group(2).strip()
                if len(m.group(1)) == 2:
                    skipping = heading.upper() in SKIPPED_SECTIONS
                    if not skipping:
                        self.emit(".SH " + escape(heading.upper()))
                elif not skipping:
                    self.emit(".SS " + inline(heading))
                i += 1
                continue
            if skipping:
                i += 1
                continue
            if line.startswith("```"):
                block = []
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    block.append(lines[i])
                    i += 1
                i += 1
                self.code_block(block)
                continue
            if line.startswith("    ") and not self.para and self.list_depth == 0:
                block = []
                while i < len(lines) and (lines[i].startswith("    ") or lines[i] == ""):
                    block.append(lines[i][4:])
                    i += 1
                while block and block[-1] == "":
                    block.pop()
                self.code_block(block)
                continue
            if line.strip() == "":
                self.flush_para()
                i += 1
                continue
            # A definition list term: the next line starts with ": ".
            if i + 1 < len(lines) and lines[i + 1].startswith(": ") and not line.startswith(": "):
                self.flush_para()
                self.close_lists()
                self.emit(".TP", line_out(inline(line.strip())))
                i += 1
                continue
            if line.startswith(": "):
                self.flush_para()
                if self.out and self.out[-1] != ".TP" and not self.out[-2:-1] == [".TP"]:
                    self.emit(".IP", "")
                    self.out.pop()
                self.para.append(line[2:])
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and not lines[i].lstrip().startswith("- "):
                    self.para.append(lines[i])
                    i += 1
                continue
            m = re.match(r"^( *)- (.*)$", line)
            if m:
                self.flush_para()
                depth = len(m.group(1)) // 2 + 1
                while self.list_depth < depth:
                    self.emit(".RS" if self.list_depth else ".RS 0")
                    self.list_depth += 1
                self.close_lists(depth)
                self.emit(".IP \\(bu 2")
                self.para.append(m.group(2))
                i += 1
                indent = " " * (2 * depth)
                while (i < len(lines) and lines[i].startswith(indent)
                       and not re.match(r"^ *- ", lines[i])):
                    self.para.append(lines[i])
                    i += 1
                continue
            if self.list_depth and not line.startswith(" "):
                self.flush_para()
                self.close_lists()
                self.emit(".PP")
            elif not self.para and not (self.out and self.out[-1].startswith((".SH", ".SS", ".TP"))):
                self.emit(".PP")
            self.para.append(line)
            i += 1
        self.flush_para()
        self.close_lists()
        if title is None:
            raise ValueError("no '# name(section)' title line")
        return "\n".join(self.out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("output")
    ap.add_argument("--version", required=True)
    a = ap.parse_args()
    with open(a.page, encoding="utf-8") as f:
        roff = Converter(a.version).convert(f.read())
    data = roff.encode("utf-8")
    if a.output.endswith(".gz"):
        with open(a.output, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as z:
                z.write(data)
    else:
        with open(a.output, "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
