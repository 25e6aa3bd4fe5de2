"""Host-side data: batches of examples with weights, and their trip to the devices."""

from jaxdist.data.batches import ArrayBatches, eval_batches, validate_arrays
from jaxdist.data.prefetch import prefetch_to_devices

__all__ = ["ArrayBatches", "eval_batches", "prefetch_to_devices", "validate_arrays"]
