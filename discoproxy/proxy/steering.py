"""Steering each client address to one of N ``SO_REUSEPORT`` sockets (issue 20: one data
plane per core): how ``workers = N`` keeps each client IP on one worker (``workers.py``).

Rules for this file:
- N sockets bound to one address with ``SO_REUSEPORT`` form a group; the kernel hands
  each new TCP connection (or UDP datagram) to one of them. A classic BPF program
  attached with ``SO_ATTACH_REUSEPORT_CBPF`` picks which: it returns an index into the
  group (the order the sockets joined). Ours returns ``hash(source address) % N``, so every
  connection and datagram of one client IP reaches the same socket, hence the same
  worker, and its per-IP state (``max_connections_per_ip``, the GCRA budgets, UDP
  sessions and limits) stays whole in one place: the limits keep their meaning.
- The program reads the source address from the network header (``SKF_NET_OFF``: the
  kernel runs it with the data past the transport header, so only that offset is
  stable), 4 bytes for IPv4, the 4 words of an IPv6 address xor-folded, chosen by the
  packet's version nibble: one program for IPv4, IPv6 and dual-stack sockets.
- :func:`steer_index` is the same function in Python: tests (and a control plane that
  wants to say which worker a client is on) compute what the kernel computes.

References: ``man 7 socket`` (SO_REUSEPORT, SO_ATTACH_REUSEPORT_CBPF), ``linux/filter.h``
(``struct sock_filter``, ``SKF_NET_OFF``), ``Documentation/networking/filter.rst``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000  # loads relative to the network (IP) header

# classic BPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JA = 0x05 | 0x00  # BPF_JMP | BPF_JA
_TAX = 0x07  # BPF_MISC | BPF_TAX: X = A
_XOR_X = 0x04 | 0xA0 | 0x08  # BPF_ALU | BPF_XOR | BPF_X
_RSH_K = 0x04 | 0x70 | 0x00  # BPF_ALU | BPF_RSH | BPF_K
_MUL_K = 0x04 | 0x20 | 0x00  # BPF_ALU | BPF_MUL | BPF_K
_MOD_K = 0x04 | 0x90 | 0x00  # BPF_ALU | BPF_MOD | BPF_K
_RET_A = 0x06 | 0x10  # BPF_RET | BPF_A

_MIX = 0x45D9F3B  # an odd multiplier that spreads neighbouring addresses apart
_MASK = 0xFFFFFFFF

# where the source address sits in each header: IPv4 at byte 12, IPv6 at byte 8
_SOURCE_WORDS: dict[int, tuple[int, ...]] = {
    socket.AF_INET: (12,),
    socket.AF_INET6: (8, 12, 16, 20),
}


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def program(workers: int) -> list[tuple[int, int, int, int]]:
    """The instructions (code, jt, jf, k) that return ``steer_index`` of the source. The
    IP version nibble picks the words to fold, so one program serves IPv4 sockets, IPv6
    ones and dual-stack ones (an IPv4 client of an IPv6 socket arrives as IPv4)."""
    if workers < 1:
        raise ValueError(f"workers: expected 1 or more, got {workers}")
    v6: list[tuple[int, int, int, int]] = []
    for n, offset in enumerate(_SOURCE_WORDS[socket.AF_INET6]):  # A = the words xor-ed
        if n:
            v6.append((_TAX, 0, 0, 0))
        v6.append((_LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & _MASK))
        if n:
            v6.append((_XOR_X, 0, 0, 0))
    (v4_word,) = _SOURCE_WORDS[socket.AF_INET]
    v4 = [(_LD_W_ABS, 0, 0, (SKF_NET_OFF + v4_word) & _MASK)]
    return [
        (_LD_B_ABS, 0, 0, SKF_NET_OFF & _MASK),  # the first byte: version << 4 | IHL
        (_RSH_K, 0, 0, 4),
        (_JEQ_K, 0, len(v6) + 1, 6),  # IPv6: fall through; else past the v6 block
        *v6,
        (_JA, 0, 0, len(v4)),
        *v4,
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),  # A = folded ^ (folded >> 16)
        (_MUL_K, 0, 0, _MIX),  # A *= MIX (mod 2**32)
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),  # A ^= A >> 16
        (_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    ]


def steer_index(address: str, workers: int) -> int:
    """The socket index the program picks for a client at *address* (IPv4-mapped IPv6
    counts as IPv4, as the kernel sees the packet)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    packed = ip.packed
    folded = 0
    for (word,) in struct.iter_unpack(">I", packed):
        folded ^= word
    value = folded ^ (folded >> 16)
    value = (value * _MIX) & _MASK
    value ^= value >> 16
    return value % workers


def attach(sock: socket.socket, workers: int) -> None:
    """Attach the steering program to *sock* (one socket of the group is enough: the
    kernel keeps one program per group). Raises OSError when the kernel refuses it."""
    instructions = program(workers)
    array = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    fprog = _SockFprog(len(instructions), array)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
