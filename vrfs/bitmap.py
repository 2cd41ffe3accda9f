"""A growable bitmap of dirty blocks: one bit per block, bit i = block i."""

from __future__ import annotations


class Bitmap:
    __slots__ = ("_bits",)

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self._bits = bytearray(data)

    def __len__(self) -> int:
        """Capacity in bits (not the number of set bits)."""
        return len(self._bits) * 8

    def _grow(self, nbits: int) -> None:
        need = (nbits + 7) // 8
        if need > len(self._bits):
            self._bits.extend(bytes(need - len(self._bits)))

    def set(self, i: int) -> None:
        self._grow(i + 1)
        self._bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        byte = i >> 3
        if byte < len(self._bits):
            self._bits[byte] &= ~(1 << (i & 7)) & 0xFF

    def test(self, i: int) -> bool:
        byte = i >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (i & 7)))

    def set_range(self, start: int, stop: int) -> int:
        """Set bits start..stop-1; returns how many of them were clear."""
        if stop <= start:
            return 0
        self._grow(stop)
        was_set = self.count_range(start, stop)
        first_full = (start + 7) >> 3
        last_full = stop >> 3  # exclusive
        if first_full >= last_full:
            for i in range(start, stop):
                self._bits[i >> 3] |= 1 << (i & 7)
            return stop - start - was_set
        for i in range(start, first_full << 3):
            self._bits[i >> 3] |= 1 << (i & 7)
        self._bits[first_full:last_full] = b"\xff" * (last_full - first_full)
        for i in range(last_full << 3, stop):
            self._bits[i >> 3] |= 1 << (i & 7)
        return stop - start - was_set

    def count_range(self, start: int, stop: int) -> int:
        """How many of bits start..stop-1 are set (reads only the bytes that hold them)."""
        if stop <= start:
            return 0
        value = int.from_bytes(self._bits[start >> 3:(stop + 7) >> 3], "little") >> (start & 7)
        return (value & ((1 << (stop - start)) - 1)).bit_count()

    def clear_from(self, start: int) -> None:
        """Clear every bit >= start (the blocks past a shrunk end of file)."""
        byte = (start + 7) >> 3
        for i in range(start, min(byte << 3, len(self))):
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        del self._bits[byte:]

    def count(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def __iter__(self):
        """Indices of set bits, ascending."""
        bits = self._bits
        for byte_index, value in enumerate(bits):
            if value:
                base = byte_index << 3
                for b in range(8):
                    if value & (1 << b):
                        yield base + b

    def __or__(self, other: "Bitmap") -> "Bitmap":
        a, b = self._bits, other._bits
        if len(a) < len(b):
            a, b = b, a
        merged = (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")
        return Bitmap(merged)

    def union_count(self, other: "Bitmap") -> int:
        """len(self | other) without building it: status and scrapes ask it
        of every disk, and a large disk's bitmap is megabytes."""
        if not other:
            return self.count()
        if not self:
            return other.count()
        return (int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")).bit_count()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self._bits.rstrip(b"\0") == other._bits.rstrip(b"\0")

    def copy(self) -> "Bitmap":
        return Bitmap(self._bits)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __bool__(self) -> bool:
        return self._bits.count(0) != len(self._bits)  # in C; any() would loop in Python
