"""Emulation of the copy schedule of conv_rows16_kernel's backward modes (no GPU).

In kGradStats / kGradOut / kGradOutW (csrc/kernels/cuda/conv_rows16.cu) a block runs the
strips blockIdx.x, blockIdx.x + gridDim.x, ... of `rows` output rows each (the last strip of
an image may have fewer). Each row's g is copied by cp.async into one of two stages, and each
strip's input into one of two ring slots:

- prologue: the first strip's input (slot 0) and its first row's g (stage 0), one commit group;
- at every row: the next row's g into the other stage, or at a strip's last row the next
  strip's input (other slot) and its first row's g (other stage); one commit group (empty or
  not); then cp.async.wait_group 1 and a barrier; the row reads its stage and its strip's
  slot; a barrier ends the row.

This script replays that schedule per block, for many grid sizes and strip shapes, tracking
what each stage and slot holds and which commit group wrote it, and asserts that (1) every row
reads the g of its own row and the input of its own strip, (2) from a group that wait_group 1
has completed, and (3) no copy overwrites a stage or slot before the row that last reads its
previous contents has ended (copies are issued at the start of a later row). Run:
python docs/checks/rows16_prefetch_schedule.py.
"""

from __future__ import annotations


class Buffers:
    """What a block's two stages and two slots hold: [contents, commit group, last reading row]."""

    def __init__(self):
        self.stage = [None, None]
        self.slot = [None, None]
        self.groups = 0  # commit groups issued so far
        self.row_index = 0  # rows the block has started

    def copy(self, kind, where, contents):
        buf = self.stage if kind == "g" else self.slot
        if buf[where] is not None:
            # issued at the start of row `row_index`: the previous contents were read
            # (nothing copied in vain) by a row that has ended
            assert 0 <= buf[where][2] < self.row_index, (kind, where, buf[where], self.row_index)
        buf[where] = [contents, self.groups, -1]

    def read(self, buf, slot, strip, r):
        g_entry, x_entry = self.stage[buf], self.slot[slot]
        assert g_entry[0] == (strip, r), (g_entry, strip, r)
        assert x_entry[0] == strip, (x_entry, strip)
        completed = self.groups - 1  # wait_group 1: all but the newest group
        assert g_entry[1] < completed and x_entry[1] < completed
        g_entry[2] = x_entry[2] = self.row_index
        self.row_index += 1


def replay(strips_per_image: int, images: int, rows_per_strip: int, h_out: int, grid: int):
    strips = strips_per_image * images

    def strip_rows(strip: int) -> int:
        oh0 = (strip % strips_per_image) * rows_per_strip
        return min(rows_per_strip, h_out - oh0)

    for block in range(min(grid, strips)):
        b = Buffers()
        b.copy("x", 0, block)  # prologue: the first strip and its first row's g
        b.copy("g", 0, (block, 0))
        b.groups += 1
        slot, buf, strip = 0, 0, block
        while strip < strips:
            rows = strip_rows(strip)
            for r in range(rows):
                if r + 1 < rows:
                    b.copy("g", buf ^ 1, (strip, r + 1))
                elif strip + grid < strips:
                    b.copy("x", slot ^ 1, strip + grid)
                    b.copy("g", buf ^ 1, (strip + grid, 0))
                b.groups += 1
                b.read(buf, slot, strip, r)
                buf ^= 1
            slot ^= 1
            strip += grid


def main():
    cases = 0
    for rows_per_strip in (1, 2, 3, 4, 5):
        for h_out in (1, 2, 3, 4, 5, 7, 9, 16, 17):
            strips_per_image = -(-h_out // rows_per_strip)
            for images in (1, 2, 3):
                for grid in (1, 2, 3, 5, 8, 64):
                    replay(strips_per_image, images, rows_per_strip, h_out, grid)
                    cases += 1
    print(f"rows16 backward copy schedule: {cases} cases agree")


if __name__ == "__main__":
    main()
