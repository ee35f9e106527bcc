#!/usr/bin/python3
"""An independent reader of TensorBoard event files, for dtrain's tests.

Reads every events.out.tfevents.* file in DIR, checks the TFRecord framing and both masked CRC-32Cs of every
record (CRC-32C computed here, bit by bit, from its definition), and parses each payload as a tensorflow.Event
with the protobuf runtime (python3-protobuf) from a schema declared here with the public field numbers of
tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto. Prints JSON:
{"files": N, "records": N, "file_versions": [...], "scalars": {tag: [[step, value, wall_time], ...]}}.
Exits 1 with a message on the first bad record.
"""
import glob
import json
import os
import struct
import sys

from google.protobuf import descriptor_pb2, descriptor_pool

try:
    from google.protobuf import message_factory
except ImportError:  # pragma: no cover
    message_factory = None


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_class():
    f = descriptor_pb2.FileDescriptorProto(name="dtrain_test_event.proto", package="tensorflow", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    value = f.message_type.add(name="SummaryValue")
    value.field.add(name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=T.TYPE_MESSAGE, label=T.LABEL_REPEATED,
                      type_name=".tensorflow.SummaryValue")
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL,
                    type_name=".tensorflow.Summary", oneof_index=0)
    event.oneof_decl.add(name="what")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    desc = pool.FindMessageTypeByName("tensorflow.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: read_tfevents.py DIR")
    Event = event_class()
    files = sorted(glob.glob(os.path.join(sys.argv[1], "events.out.tfevents.*")))
    out = {"files": len(files), "records": 0, "file_versions": [], "scalars": {}}
    for path in files:
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            where = f"{path} at byte {pos}"
            if pos + 12 > len(data):
                sys.exit(f"{where}: truncated record header")
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            if masked(header) != length_crc:
                sys.exit(f"{where}: bad length CRC")
            if pos + 12 + length + 4 > len(data):
                sys.exit(f"{where}: truncated record of {length} bytes")
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            if masked(payload) != payload_crc:
                sys.exit(f"{where}: bad payload CRC")
            pos += 16 + length
            event = Event()
            event.ParseFromString(payload)
            out["records"] += 1
            if event.file_version:
                out["file_versions"].append(event.file_version)
            for v in event.summary.value:
                out["scalars"].setdefault(v.tag, []).append([event.step, v.simple_value, event.wall_time])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
