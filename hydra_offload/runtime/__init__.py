"""Device-agnostic primitives shared by the backends.

On an accelerator they are the real things (page-locked host memory, a copy stream, events);
with the compute device = CPU, host storage is a separate CPU buffer, copies are synchronous
and streams and events are no-ops, so the same backend code runs, and is tested, on CPU.
"""

from hydra_offload.runtime.device import DeviceRuntime, NullEvent, NullStream
from hydra_offload.runtime.host import HostStorage
from hydra_offload.runtime.pool import BufferPool, Slot

__all__ = ["BufferPool", "DeviceRuntime", "HostStorage", "NullEvent", "NullStream", "Slot"]
