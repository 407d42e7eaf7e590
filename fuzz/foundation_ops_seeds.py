#!/usr/bin/env python3
"""Writes the seed inputs of foundation_ops_fuzz into fuzz/corpus/foundation_ops/.

Each seed is a plausible device life (memory table, dirty log, IOMMU, IOTLB entries,
reads and writes) in the target's input format, so that the fuzzer starts from states
where translations succeed and writes are logged, and mutates from there. The encoding
mirrors the readers in foundation_ops_fuzz.cpp: keep the two in step.

Usage: fuzz/foundation_ops_seeds.py [output directory]
"""
import os
import struct
import sys

# Opcodes (Run::step() takes the opcode byte modulo 20).
SET_MEM_TABLE, ADD_REGION, REMOVE_REGION, CLEAR = 0, 1, 2, 3
UPDATE_GPA, UPDATE_UADDR, INVALIDATE, FLUSH = 4, 5, 6, 7
SET_IOMMU, SET_LOG, SET_LOGGING, WRITE = 8, 9, 10, 11
READ, TRANSLATE, LOG_WRITE, TAKE_LOG, NEW_TRANSLATOR, SYNCHRONIZE, TOUCH_TWICE = (
    13, 14, 15, 16, 17, 18, 19)

READ_ACCESS, WRITE_ACCESS, READ_WRITE = 1, 2, 3


def u8(v):
    return bytes([v & 0xFF])


def u16(v):
    return struct.pack('<H', v & 0xFFFF)


def num(v):
    """number(): small multiples of 16 and page multiples compactly, anything raw."""
    if v % 16 == 0 and v // 16 < 0x10000:
        return u8(0) + u16(v // 16)
    if v % 4096 == 0 and v // 4096 < 0x100:
        return u8(100) + u8(v // 4096)
    return u8(255) + struct.pack('<Q', v)


def gpa_num(v):
    return u8(200) + num(v)


def gpa_ref(index, count, delta=0, end=False):
    """gpa(): the start (or end) of the index-th region in GPA order, plus delta."""
    sel = index % count * 2 + int(end)
    return u8(sel) + u16(delta)


def uaddr_ref(index, count, delta=0):
    return u8(index % count) + u16(delta)


def dev_num(v):
    """device_addr(): a plain number (an IOVA with the IOMMU on, a GPA with it off)."""
    return u8(200) + num(v)


def dev_entry(index, count, delta=0):
    """device_addr(): the start of the index-th IOTLB entry (IOMMU on), plus delta."""
    sel = index % count * 2
    return u8(sel) + u16(delta)


def dev_gpa(ref):
    """device_addr() via gpa(): for the IOMMU off."""
    return u8(140) + ref


def region(fd, offset, size, gpa):
    """region(): memfd fd (0: 8 KiB, 1: 64 KiB + 100, 2: 128 KiB), consistent uaddr."""
    return u8(fd) + u8(1) + num(offset) + num(size - 1) + num(gpa)


def header(max_regions=8, max_entries=64, modes=0b01):
    return u8(max_regions - 1) + u8(max_entries - 1) + u8(modes)


def set_mem_table(*regions):
    return u8(SET_MEM_TABLE) + u8(len(regions)) + b''.join(regions)


def log_over(offset, size):
    return u8(SET_LOG) + u8(10) + u8(offset) + u16(size - 1)


def log_map(size, offset):
    return u8(SET_LOG) + u8(150) + num(size) + num(offset)


def write(translator, addr, length, seed=0x5A, burst=True):
    return u8(WRITE) + u8(translator) + addr + u16(length) + u8(seed) + u8(int(burst))


def read(translator, addr, length):
    return u8(READ) + u8(translator) + addr + u16(length)


def translate(translator, addr, length, access=READ_ACCESS, room=0):
    return u8(TRANSLATE) + u8(translator) + addr + num(length) + u8(access - 1) + u8(room)


def log_write(translator, addr, length):
    return u8(LOG_WRITE) + u8(translator) + addr + num(length)


def seeds():
    # Two GPA-adjacent regions from different memfds, from GPA 0; no IOMMU; logged writes
    # across the boundary, reads back, the log harvested.
    two = set_mem_table(region(2, 0x4000, 0x10000, 0x0), region(1, 0x1000, 0x8000, 0x10000))
    yield 'plain_logged_writes', (
        header() + two + log_over(8, 64) + u8(SET_LOGGING) + u8(1) +
        write(0, dev_gpa(gpa_ref(0, 2, -16, end=True)), 64) +
        write(1, dev_gpa(gpa_ref(1, 2, 0x100)), 5000, seed=3, burst=False) +
        read(0, dev_gpa(gpa_ref(0, 2, -100, end=True)), 300) +
        translate(1, dev_gpa(gpa_ref(0, 2, -8, end=True)), 16, WRITE_ACCESS) +
        log_write(0, dev_gpa(gpa_ref(1, 2, 0x10)), 0x2000) +
        u8(TAKE_LOG) + num(0) + num(0x100))

    # IOMMU on: entries by GPA and by uaddr, writes through them, a partial invalidation,
    # then a new memory table (the IOTLB must be empty after it).
    yield 'iommu_entries', (
        header(modes=0b10) + two + log_over(0, 128) + u8(SET_LOGGING) + u8(1) +
        u8(SET_IOMMU) + u8(1) +
        u8(UPDATE_GPA) + dev_num(0x100000) + num(0x3000) + gpa_ref(0, 2, -0x2000, end=True) +
        u8(READ_WRITE) +
        u8(UPDATE_UADDR) + dev_num(0x104000) + num(0x2000) + uaddr_ref(1, 2, 0x100) +
        u8(WRITE_ACCESS) +
        write(0, dev_entry(0, 2, 0x10), 0x2000) +
        write(1, dev_entry(1, 2, 0), 0x1000, seed=9) +
        read(0, dev_entry(0, 2, 0), 0x2000) +
        u8(INVALIDATE) + dev_entry(0, 2, 0x800) + num(0x1000) +
        write(0, dev_entry(0, 2, 0), 0x2000) +
        translate(1, dev_entry(1, 4, 0), 0x1000, WRITE_ACCESS, room=3) +
        set_mem_table(region(0, 0, 0x2000, 0x40000)) +
        write(0, dev_num(0x100000), 8))

    # Aliases: one memfd range at two GPAs; a write through one must dirty both.
    yield 'aliases', (
        header() +
        set_mem_table(region(2, 0x2000, 0x8000, 0x0), region(2, 0x4000, 0x8000, 0x100000)) +
        log_over(16, 512) + u8(SET_LOGGING) + u8(1) +
        write(0, dev_gpa(gpa_ref(0, 2, 0x1FF0)), 0x2000) +
        write(1, dev_gpa(gpa_ref(1, 2, 0)), 0x100, burst=False) +
        u8(SET_IOMMU) + u8(1) +
        u8(UPDATE_UADDR) + dev_num(0x2000) + num(0x6000) + uaddr_ref(0, 2, 0x1000) +
        u8(READ_WRITE) +
        write(0, dev_entry(0, 1, 0), 0x2000))

    # Hot-added regions, one beyond a small mapped log; removal; the log replaced.
    yield 'hotplug_and_log_fd', (
        header(max_regions=3, max_entries=4) +
        set_mem_table(region(1, 0, 0x10000, 0x0)) +
        log_map(2, 0) + u8(SET_LOGGING) + u8(1) +
        u8(ADD_REGION) + region(0, 0, 0x2000, 0x10000) +
        u8(ADD_REGION) + region(2, 0x1000, 0x4000, 0x40000) +
        write(0, dev_gpa(gpa_ref(1, 3, 0)), 0x2000) +
        write(1, dev_gpa(gpa_ref(2, 3, 0)), 0x100) +
        u8(REMOVE_REGION) + u8(1) +
        log_map(64, 0x1000) +
        write(0, dev_gpa(gpa_ref(1, 2, 0x10)), 0x100) +
        u8(NEW_TRANSLATOR) + u8(0) + u8(1) +
        u8(TAKE_LOG) + num(0) + num(0x1000))

    # A small IOTLB limit filled by many updates (eviction), misses, flush.
    many = b''.join(u8(UPDATE_GPA) + dev_num(0x200000 + i * 0x1000) + num(0x1000) +
                    gpa_ref(0, 1, i * 0x100) + u8(READ_WRITE) for i in range(12))
    yield 'iotlb_eviction', (
        header(max_entries=8) + set_mem_table(region(2, 0, 0x20000, 0x80000)) +
        u8(SET_IOMMU) + u8(1) + many +
        read(0, dev_num(0x200000), 0x2000) + read(1, dev_num(0x20B000), 0x800) +
        u8(TOUCH_TWICE) + u8(0) + dev_entry(0, 8, 0) + u8(200) +
        u8(FLUSH) + read(0, dev_num(0x20B000), 1))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), 'corpus', 'foundation_ops')
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, name), 'wb') as f:
            f.write(data)


if __name__ == '__main__':
    main()
