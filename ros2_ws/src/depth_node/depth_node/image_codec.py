"""sensor_msgs Image / CompressedImage pixels <-> numpy, duck-typed on the message fields: encodings, `step`
padding, byte order, JPEG/PNG; plus the zero-copy message buffers the codec builds outgoing messages with.

Works on rclpy messages and on rosbags messages alike (only the field names are read); nothing here imports ROS.
Malformed input (unsupported encoding, zero size, truncated data, step too small) raises ValueError with a message
naming the problem, so the node can warn once, skip the frame and keep running. Message building: `codec.py`.
"""

from __future__ import annotations

import array
import struct
from typing import Any, NamedTuple

import cv2
import numpy as np


class _Encoding(NamedTuple):
    dtype: str  # numpy type of one channel
    channels: int  # channels per pixel as stored (yuv422: 2 bytes per pixel)
    order: str  # "rgb", "bgr" (reordered to RGB), "mono" (returned as is) or "cv2" (decoded with cv2_code)
    cv2_code: int = -1


_BAYER_YUV = {
    # OpenCV names Bayer patterns by the second row's 2x2 block: ROS "rggb" is OpenCV "BG" (same constant).
    "bayer_rggb8": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr8": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg8": cv2.COLOR_BayerGB2RGB,
}
_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding("u1", 3, "rgb"),
    "rgba8": _Encoding("u1", 4, "rgb"),
    "bgr8": _Encoding("u1", 3, "bgr"),
    "bgra8": _Encoding("u1", 4, "bgr"),
    "8UC3": _Encoding("u1", 3, "bgr"),  # OpenCV's default channel order, as cv_bridge reads it
    "rgb16": _Encoding("u2", 3, "rgb"),
    "rgba16": _Encoding("u2", 4, "rgb"),
    "bgr16": _Encoding("u2", 3, "bgr"),
    "bgra16": _Encoding("u2", 4, "bgr"),
    "mono8": _Encoding("u1", 1, "mono"),
    "8UC1": _Encoding("u1", 1, "mono"),
    "mono16": _Encoding("u2", 1, "mono"),
    "16UC1": _Encoding("u2", 1, "mono"),
    "16SC1": _Encoding("i2", 1, "mono"),
    "32FC1": _Encoding("f4", 1, "mono"),
    **{name: _Encoding("u1", 1, "cv2", code) for name, code in _BAYER_YUV.items()},
    "yuv422": _Encoding("u1", 2, "cv2", cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": _Encoding("u1", 2, "cv2", cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Encoding("u1", 2, "cv2", cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": _Encoding("u1", 2, "cv2", cv2.COLOR_YUV2RGB_YUY2),
}
# Encodings that carry measurements (metres, signed values), not light: to_rgb refuses them.
_NOT_CAMERA = ("16SC1", "32FC1")
# Images larger than this are refused before any pixel is decoded (a few hundred bytes of JPEG or PNG can declare
# gigabytes of pixels): 40 MP covers 8K cameras (8192x4320 = 35.4 MP). The node's `max_image_pixels` parameter.
MAX_IMAGE_PIXELS = 40_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): every 0xC0-0xCF but DHT, JPG and DAC.
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def shown(text: object, limit: int = 40) -> str:
    """A string from a message (encoding, format, field names) quoted as it may be logged: escaped when it holds
    control characters, cut at `limit` characters saying how long it was. Senders choose these strings."""
    text = str(text)
    quoted = f"'{text[:limit]}'" if text[:limit].isprintable() else repr(text[:limit])
    return quoted + (f"... ({len(text)} characters)" if len(text) > limit else "")


def _lookup(encoding: str) -> _Encoding:
    try:
        return _ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unsupported image encoding {shown(encoding)} (supported: {', '.join(_ENCODINGS)})") from None


def message_bytes(data: Any) -> np.ndarray:
    """msg.data (bytes, array.array, numpy uint8 or list of ints) as a flat uint8 array, without a copy if possible."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def message_array(shape: tuple[int, ...], dtype: np.dtype | str) -> tuple[array.array, np.ndarray]:
    """A zeroed array.array('B') for a message's uint8[] `data` and a writable numpy view of it.

    Fill the view, then give the buffer to new_message: the payload is written once, straight into the memory the
    message keeps. Every extra fresh buffer of a 375x1242 cloud (7.5 MB) costs ~5 ms in page faults here, so
    array.tobytes() followed by `msg.data = ...` (two more buffers) made clouds 4-5x slower (see
    benchmarks/cloud_packing.py).
    """
    dtype = np.dtype(dtype)
    buffer = array.array("B", b"\0") * (int(np.prod(shape)) * dtype.itemsize)
    return buffer, np.frombuffer(buffer, dtype=dtype).reshape(shape)


def message_buffer(view: np.ndarray) -> array.array | None:
    """The array.array('B') whose bytes `view` covers exactly and in order (a message_array view), or None."""
    owner = view
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    if not (isinstance(owner, array.array) and owner.typecode == "B" and view.flags.c_contiguous):
        return None
    address, length = owner.buffer_info()
    return owner if (view.ctypes.data, view.nbytes) == (address, length) else None


def new_message(message_type: type, data: array.array, **fields: Any) -> Any:
    """message_type(**fields) with `data` attached without a copy.

    Message constructors always copy `data`; the field setter keeps an array.array('B') as is when the message checks
    its fields (check_fields=True on Jazzy and later, always on older distros) and copies it otherwise. The checks
    on the other fields cost microseconds.
    """
    checked = {"check_fields": True} if "_check_fields" in getattr(message_type, "__slots__", ()) else {}
    message = message_type(**fields, **checked)
    message.data = data
    return message


def check_pixel_count(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise ValueError when a width x height image exceeds max_pixels (before it is decoded)."""
    if width * height > max_pixels:
        megapixels = width * height / 1e6
        raise ValueError(f"{what} {width}x{height} ({megapixels:.1f} MP), more than max_image_pixels={max_pixels}")


def _pixels(msg: Any, spec: _Encoding, max_pixels: int) -> np.ndarray:
    """Strided view of the pixels, (H, W, C) or (H, W) for one channel, in native byte order; validates the layout."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f"zero-size image ({width}x{height}, encoding {msg.encoding})")
    check_pixel_count(width, height, max_pixels, "image is")
    dtype = np.dtype(spec.dtype).newbyteorder(">" if msg.is_bigendian else "<")
    pixel_bytes = spec.channels * dtype.itemsize
    if step < width * pixel_bytes:
        raise ValueError(f"image step {step} < width {width} x {pixel_bytes} bytes per pixel ({msg.encoding})")
    buffer = message_bytes(msg.data)
    if buffer.size < step * height:
        raise ValueError(f"truncated image: {buffer.size} bytes of data, step x height = {step * height}")
    shape = (height, width, spec.channels)
    view = np.ndarray(shape, dtype=dtype, buffer=buffer, strides=(step, pixel_bytes, dtype.itemsize))
    if spec.channels == 1:
        view = view[..., 0]
    return view if dtype.isnative else view.astype(dtype.newbyteorder("="))


def image_to_numpy(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a sensor_msgs/Image, honouring `step` row padding and `is_bigendian`.

    Args:
        msg: anything with height, width, encoding, is_bigendian, step, data.

    Returns:
        Colour encodings: (H, W, 3) RGB in the encoding's depth (uint8, or uint16 for rgb16/bgr16/...), alpha dropped;
        bayer_* are demosaiced and yuv422 (UYVY) / yuv422_yuy2 (YUYV) converted to RGB uint8.
        One-channel encodings: (H, W) in their own type (mono16/16UC1 uint16, 32FC1 float32, ...).
        rgb/rgba and one-channel results are views of msg.data (no copy; read-only when data is bytes).

    Raises:
        ValueError: unsupported encoding, zero size, more than max_pixels, step smaller than a row, data shorter
            than step x height.
    """
    spec = _lookup(msg.encoding)
    pixels = _pixels(msg, spec, max_pixels)
    if spec.order == "rgb":
        return pixels[..., :3]
    if spec.order == "bgr":
        return np.ascontiguousarray(pixels[..., 2::-1])
    if spec.order == "cv2":
        if spec.channels == 2 and pixels.shape[1] % 2:
            raise ValueError(f"{msg.encoding} needs an even width, got {pixels.shape[1]}")
        return cv2.cvtColor(np.ascontiguousarray(pixels), spec.cv2_code)
    return pixels


def to_rgb(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A camera image as (H, W, 3) uint8 RGB for the model input.

    Mono images are replicated to three channels; 16-bit images keep their top 8 bits (full-range scaling, stable from
    frame to frame; a 12-bit camera therefore looks dark). Measurement encodings (32FC1, 16SC1) raise ValueError.
    """
    if msg.encoding in _NOT_CAMERA:
        raise ValueError(f"encoding {msg.encoding} holds measurements, not a camera image: cannot feed it as RGB")
    image = image_to_numpy(msg, max_pixels)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image


def image_msg_to_rgb(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a sensor_msgs/Image (`to_rgb`) or CompressedImage (`compressed_to_numpy`, which has
    a `format`); rclpy and rosbags messages alike. ValueError when it is malformed or larger than max_pixels."""
    return compressed_to_numpy(msg, max_pixels) if hasattr(msg, "format") else to_rgb(msg, max_pixels)


def declared_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) a PNG (IHDR) or JPEG (start-of-frame) file declares, read from its header without decoding any
    pixel; None when the bytes are neither, or end before the size."""
    head = bytes(data[:24])
    if head.startswith(_PNG_SIGNATURE):
        return struct.unpack(">II", head[16:24]) if len(head) == 24 and head[12:16] == b"IHDR" else None
    if not head.startswith(b"\xff\xd8"):
        return None
    view, position = memoryview(data), 2
    while position + 4 <= len(view):  # segments: 0xFF, marker, 2-byte length (counting itself), payload
        if view[position] != 0xFF:
            return None
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a payload
            position += 2
        elif marker in _JPEG_FRAMES:
            if position + 9 > len(view):
                return None
            height, width = struct.unpack(">HH", view[position + 5 : position + 9])
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, or entropy-coded data before any frame header
            return None
        else:
            position += 2 + (view[position + 2] << 8 | view[position + 3])
    return None


def compressed_to_numpy(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to (H, W, 3) uint8 RGB.

    `format` follows compressed_image_transport ("rgb8; jpeg compressed bgr8"): the word after "compressed" is the
    channel order inside the file; it is BGR unless it says rgb*, and BGR when the format is just "jpeg" or empty.

    The size the file declares is checked against max_pixels before anything is decoded.

    Raises:
        ValueError: empty data, not a JPEG/PNG, more than max_pixels, undecodable, or a compressedDepth image.
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise ValueError(f"CompressedImage format {shown(msg.format)} is compressedDepth, not a colour image")
    buffer = message_bytes(msg.data)
    if buffer.size == 0:
        raise ValueError("CompressedImage has no data")
    size = declared_size(buffer)
    if size is None:
        raise ValueError(
            f"could not decode CompressedImage ({buffer.size} bytes, format {shown(msg.format)}) as JPEG/PNG"
        )
    check_pixel_count(*size, max_pixels, "CompressedImage declares")
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error:
        decoded = None
    if decoded is None:
        raise ValueError(
            f"could not decode CompressedImage ({buffer.size} bytes, format {shown(msg.format)}) as JPEG/PNG"
        )
    if fmt.partition("compressed")[2].strip().startswith("rgb"):
        return decoded
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def numpy_to_image_fields(image: np.ndarray, encoding: str, bigendian: bool = False) -> dict[str, Any]:
    """The fields of a sensor_msgs/Image holding `image`: the inverse of image_to_numpy.

    Args:
        image: (H, W) for one-channel encodings; (H, W, 3) RGB for colour ones ((H, W, 4) RGBA for *a encodings,
            or (H, W, 3) and alpha is set opaque). Its dtype must cast safely ("same kind") to the encoding's type.
        encoding: a ROS encoding name; bayer_* and yuv422* are input-only.
        bigendian: write multi-byte values big-endian.

    Returns:
        dict(height, width, encoding, is_bigendian, step, data) with no row padding; data is array.array('B'):
        build the message with new_message(Image, header=..., **fields) to keep it without a copy. When `image` is
        a whole message_array view already stored as the encoding says, data is that buffer itself (no copy).
    """
    spec = _lookup(encoding)
    if spec.order == "cv2":
        raise ValueError(f"encoding {encoding} is input-only")
    image = np.asarray(image)
    dtype = np.dtype(spec.dtype)
    if not np.can_cast(image.dtype, dtype, "same_kind"):
        raise ValueError(f"cannot store a {image.dtype} array as {encoding} ({dtype})")
    if spec.channels == 1 and image.ndim != 2:
        raise ValueError(f"{encoding} needs an (H, W) array, got shape {image.shape}")
    if spec.channels > 1:
        if image.ndim != 3 or image.shape[2] not in (3, spec.channels):
            raise ValueError(f"{encoding} needs an (H, W, 3) RGB array, got shape {image.shape}")
        if image.shape[2] < spec.channels:
            opaque = np.full(image.shape[:2] + (1,), np.iinfo(dtype).max, dtype)
            image = np.concatenate([image.astype(dtype, copy=False), opaque], axis=2)
        if spec.order == "bgr":
            image = image[..., [2, 1, 0, 3][: spec.channels]]
    stored_dtype = dtype.newbyteorder(">" if bigendian else "<")
    data = message_buffer(image) if image.dtype == stored_dtype else None
    if data is not None:  # already in a message buffer in this very layout (the node's depth): kept, not copied
        stored = image
    else:
        data, stored = message_array(image.shape, stored_dtype)
        stored[...] = image
    height, width = stored.shape[:2]
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "is_bigendian": int(bigendian),
        "step": width * spec.channels * dtype.itemsize,
        "data": data,
    }
