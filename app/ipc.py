"""How a front process and the model owner talk (app/owner_client.py, app/owner_server.py): one Unix-socket
connection per front, carrying messages, and one block of shared memory per front, carrying its pictures.

A message is a JSON header and, after it, the raw bytes of any arrays it carries (embeddings, heatmaps,
contribution matrices): never pickled objects. Pictures, the bulk of the traffic, do not travel in messages at
all: the front writes each one into a slot of its shared block (a memfd the owner maps through /proc) and sends
the slot's number; the owner reads the slots when it stacks a batch, and the slot is the front's again once the
job's last message (its result, its failure, or its withdrawal) arrives. (JPEG files that the owner's GPU decodes,
with DECODE_DEVICE=cuda, travel as arrays of their submit message: a file's size has no slot.)"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.jobs import EncodedJpeg, JobPicture
from contract.explanation import PairContributions, PairExplanation, PairMaps
from contract.images import CorruptImage, ImageError, NotAnImage, TooManyPixels

_HEADER = struct.Struct("!II")  # the JSON's length, then the arrays' bytes' length


def encode(message: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    """A message with `arrays` after it; their dtypes and shapes go in the message as `arrays`."""
    if arrays:
        message = {**message, "arrays": [[array.dtype.str, list(array.shape)] for array in arrays]}
    header = json.dumps(message, separators=(",", ":")).encode()
    payload = b"".join(np.ascontiguousarray(array).tobytes() for array in arrays)
    return _HEADER.pack(len(header), len(payload)) + header + payload


async def receive(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The next message and its arrays; IncompleteReadError once the other side has gone."""
    header_length, payload_length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    message = json.loads(await reader.readexactly(header_length))
    # A bytearray: arrays over it are writable, as torch.from_numpy wants them.
    payload = bytearray(await reader.readexactly(payload_length)) if payload_length else bytearray()
    arrays, offset = [], 0
    for dtype, shape in message.get("arrays", ()):
        array = np.frombuffer(payload, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        arrays.append(array.reshape(shape))
        offset += array.nbytes
    return message, arrays


# Job values, by queue kind: a score (similarity), an embedding (embed), a PairExplanation (explain queues).


def encode_value(value: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    if isinstance(value, float):
        return {"score": value}, []
    if isinstance(value, np.ndarray):
        return {"embedding": True}, [value]
    assert isinstance(value, PairExplanation), type(value)
    arrays = list(value.maps)
    fields: dict[str, Any] = {"score": value.score, "similar": value.similar}
    if (found := value.contributions) is not None:
        fields["contributions"] = [found.raw_logit, found.offset, found.threshold_raw_logit]
        arrays += [found.correspondence, found.relative1, found.relative2]
    return {"explanation": fields}, arrays


def decode_value(message: dict[str, Any], arrays: list[np.ndarray]) -> Any:
    if "embedding" in message:
        return arrays[0]
    if "explanation" not in message:
        return message["score"]
    fields = message["explanation"]
    found = None
    if "contributions" in fields:
        raw_logit, offset, threshold_raw_logit = fields["contributions"]
        found = PairContributions(raw_logit, offset, threshold_raw_logit, *arrays[4:7])
    return PairExplanation(fields["score"], fields["similar"], PairMaps(*arrays[:4]), found)


# A job's pictures, as a submit message names them: the slot each was copied to, or, for a JPEG that the owner's
# GPU decodes (DECODE_DEVICE=cuda), its file: an index among the message's arrays, with its name and orientation.
PictureReference = int | dict[str, Any]


def picture_references(pictures: Sequence[JobPicture], slots: Sequence[int], files: list[np.ndarray]
                       ) -> list[PictureReference]:
    """How a submit message names `pictures`, whose decoded ones were copied to `slots` in order; each JPEG's file
    is appended to `files`, the message's arrays."""
    free = iter(slots)
    references: list[PictureReference] = []
    for picture in pictures:
        if isinstance(picture, EncodedJpeg):
            references.append({"file": len(files), "name": picture.name, "orientation": picture.orientation})
            files.append(picture.data)
        else:
            references.append(next(free))
    return references


def referenced_pictures(references: Sequence[PictureReference], slots: np.ndarray, files: Sequence[np.ndarray]
                        ) -> tuple[JobPicture, ...]:
    """The pictures a submit message names: views of the front's `slots` [count, 3, H, W], or JPEG files."""
    return tuple(slots[reference] if isinstance(reference, int) else
                 EncodedJpeg(reference["name"], files[reference["file"]], reference["orientation"])
                 for reference in references)


# The image errors a job can fail with in the owner (a JPEG its GPU could not decode), by name.
IMAGE_ERRORS: dict[str, type[ImageError]] = {kind.__name__: kind for kind in (CorruptImage, NotAnImage, TooManyPixels)}


class PictureSlots:
    """A front's block of shared memory: `count` slots of one picture each (uint8 [3, H, W])."""

    def __init__(self, count: int, shape: tuple[int, int, int]) -> None:
        self.count = count
        self.shape = shape
        self.slot_bytes = int(np.prod(shape))
        self.fd = os.memfd_create("siamcam-pictures", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, count * self.slot_bytes)
        self._memory = mmap.mmap(self.fd, count * self.slot_bytes)
        self._block = np.frombuffer(self._memory, dtype=np.uint8).reshape(count, *shape)
        # Lowest first: a steady load keeps reusing the same few slots, so few pages are ever touched.
        self._free = list(range(count))

    def take(self, pictures: Sequence[np.ndarray]) -> list[int]:
        """Copy `pictures` into free slots and return their numbers; IndexError when too few are free."""
        if len(pictures) > len(self._free):
            raise IndexError("no free picture slots")
        self._free.sort(reverse=True)
        slots = [self._free.pop() for _ in pictures]
        for slot, picture in zip(slots, pictures, strict=True):
            self._block[slot] = picture
        return slots

    def give_back(self, slots: Sequence[int]) -> None:
        self._free.extend(slots)

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        del self._block
        self._memory.close()
        os.close(self.fd)


def map_front_pictures(pid: int, fd: int, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The owner's view of front `pid`'s slots: [count, 3, H, W], read only (opened through /proc, which the
    front's parent, the owner, may do)."""
    with open(f"/proc/{pid}/fd/{fd}", "rb") as file:
        memory = mmap.mmap(file.fileno(), count * int(np.prod(shape)), prot=mmap.PROT_READ)
    return np.frombuffer(memory, dtype=np.uint8).reshape(count, *shape)
