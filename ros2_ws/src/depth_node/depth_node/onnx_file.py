"""Checks on an ONNX file before ONNX Runtime opens it: tensors stored as external data must live in files inside the
model's own folder. No `onnx` import: the protobuf is walked here, reading only the fields on the way to tensors.

ONNX Runtime releases the node allows (1.20 among them) read an external-data `location` such as "/etc/passwd",
"../secret" or a symlink out of the folder, and the bytes then flow through the network onto `depth`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

# Field numbers (onnx.proto3) of the messages on the way from a ModelProto to its TensorProtos.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_NODE_ATTRIBUTES, _FUNCTION_NODES = 5, 7
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def _fields(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, payload) of the length-delimited fields of one message; other wire types are skipped."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("truncated field")
            yield number, data[position : position + length]
            position += length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")


def _tensors_of_graph(graph: memoryview) -> Iterator[memoryview]:
    for number, payload in _fields(graph):
        if number == _GRAPH_INITIALIZERS:
            yield payload
        elif number == _GRAPH_SPARSE_INITIALIZERS:
            yield from (part for key, part in _fields(payload) if key in (_SPARSE_VALUES, _SPARSE_INDICES))
        elif number == _GRAPH_NODES:
            yield from _tensors_of_node(payload)


def _tensors_of_node(node: memoryview) -> Iterator[memoryview]:
    for number, attribute in _fields(node):
        if number != _NODE_ATTRIBUTES:
            continue
        for key, payload in _fields(attribute):
            if key in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                yield payload
            elif key in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                yield from _tensors_of_graph(payload)
            elif key in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
                yield from (part for field, part in _fields(payload) if field in (_SPARSE_VALUES, _SPARSE_INDICES))


def external_data_locations(model: bytes) -> list[tuple[str, str]]:
    """(tensor name, `location`) of every tensor of a serialized ModelProto stored as external data.

    Raises:
        ValueError: the bytes are not a well-formed protobuf.
    """
    tensors = []
    for number, payload in _fields(memoryview(model)):
        if number == _MODEL_GRAPH:
            tensors.extend(_tensors_of_graph(payload))
        elif number == _MODEL_FUNCTIONS:
            for field, node in _fields(payload):
                if field == _FUNCTION_NODES:
                    tensors.extend(_tensors_of_node(node))
    found = []
    for tensor in tensors:
        name, location = "", None
        for number, payload in _fields(tensor):
            if number == _TENSOR_NAME:
                name = bytes(payload).decode(errors="replace")
            elif number == _TENSOR_EXTERNAL_DATA:
                entry = dict(_fields(payload))
                if bytes(entry.get(_ENTRY_KEY, b"")) == b"location":
                    location = bytes(entry.get(_ENTRY_VALUE, b"")).decode(errors="replace")
        if location is not None:
            found.append((name, location))
    return found


def external_data_problem(path: Path) -> str | None:
    """Why an ONNX file's external data may not be read, or None: a location that is absolute, uses `..`, or is a
    file resolving (through symlinks) outside the model's folder. A malformed protobuf is left to ONNX Runtime."""
    try:
        locations = external_data_locations(Path(path).read_bytes())
    except ValueError:
        return None
    folder = Path(path).resolve().parent
    for name, location in locations:
        forms = (PurePosixPath(location), PureWindowsPath(location))
        escapes = any(form.is_absolute() or form.drive or ".." in form.parts for form in forms)
        if escapes or not (folder / location).resolve().is_relative_to(folder):
            return (
                f"tensor '{name}' keeps its data in '{location}', outside the model's folder: refused "
                "(external data must be a file beside the model)"
            )
    return None
