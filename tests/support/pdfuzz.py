"""Seeded random protocol messages for the fuzz tests: fill() sets a random subset of
a protobuf message's fields (nested messages, repeated fields, edge-case numbers,
NaN and infinities, long and odd strings, unknown enum values) from its descriptor,
and mutate() flips, cuts, inserts and overwrites bytes of a serialized message. Both
draw from the random.Random they are given, so a failure replays from its seed."""
from google.protobuf.descriptor import FieldDescriptor as FD

EDGE_INTS = [0, 1, 2, 3, 16, 255, 256, 511, 512, 4096, 10 ** 9, -1, 2 ** 31 - 1,
             -2 ** 31, 2 ** 32 - 1, 2 ** 63 - 1]
EDGE_FLOATS = [0.0, 1.0, -1.0, 0.5, 2.0, 1e-40, 1e30, -1e30, float("nan"),
               float("inf"), float("-inf")]
STRINGS = ["", "Once upon a time", "\u00e9\u20ac", "a\x00b", "x" * 3000]


def _int(r, f):
    v = r.choice(EDGE_INTS) if r.random() < 0.7 else r.randrange(-1000, 1000)
    if f.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return v % 2 ** 32
    if f.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return v % 2 ** 64
    if f.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return (v + 2 ** 31) % 2 ** 32 - 2 ** 31
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


def _scalar(r, f):
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return r.choice(EDGE_FLOATS)
    if f.type == FD.TYPE_BOOL:
        return r.random() < 0.5
    if f.type == FD.TYPE_STRING:
        return r.choice(STRINGS)
    if f.type == FD.TYPE_BYTES:
        return bytes(r.randrange(256) for _ in range(r.choice([0, 1, 8, 32, 100])))
    if f.type == FD.TYPE_ENUM:
        return r.choice([v.number for v in f.enum_type.values] + [99])
    return _int(r, f)


def fill(r, msg, depth=0):
    """Sets a random subset of msg's fields; returns msg."""
    for f in msg.DESCRIPTOR.fields:
        if r.random() < 0.4 or depth > 3:
            continue
        repeated = f.label == FD.LABEL_REPEATED
        for _ in range(r.choice([1, 1, 2, 5, 40]) if repeated else 1):
            if f.type == FD.TYPE_MESSAGE:
                sub = getattr(msg, f.name).add() if repeated else getattr(msg, f.name)
                fill(r, sub, depth + 1)
                if not repeated:
                    sub.SetInParent()
            elif repeated:
                getattr(msg, f.name).append(_scalar(r, f))
            else:
                setattr(msg, f.name, _scalar(r, f))
    return msg


def mutate(r, data):
    """1-5 random byte edits of data."""
    b = bytearray(data)
    for _ in range(r.randrange(1, 6)):
        op = r.randrange(4)
        if op == 0 and b:
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif op == 1 and b:
            del b[r.randrange(len(b)):]
        elif op == 2:
            i = r.randrange(len(b) + 1)
            b[i:i] = bytes(r.randrange(256) for _ in range(r.randrange(1, 8)))
        elif b:
            b[r.randrange(len(b))] = r.choice([0, 0x7F, 0x80, 0xFF])
    return bytes(b)


def noise(r, n_max=64):
    return bytes(r.randrange(256) for _ in range(r.randrange(0, n_max)))
