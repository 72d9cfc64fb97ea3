"""Library defaults, in one place. CLI options default to ``None`` and are filled in from here."""

from __future__ import annotations

import os

#: Encoder used when none is named: offline weights installed from the package registry.
DEFAULT_ENCODER = "efficientnet-lite0-ms"

#: Lattice cells per block side (at most). A block is one super-tile read and one unit of work; it is
#: halved (32, 16, 8) while its side would exceed MAX_SUPERTILE_PX at the read level, so a super-tile
#: stays under ~200 MB of uint8 whatever the stride.
BLOCK_CELLS = 128
MAX_SUPERTILE_PX = 8192

#: Cells per Zarr chunk side (blocks divide it or are multiples of it).
CHUNK_CELLS = 64

#: A spot is kept when at least this fraction of its disk lies on tissue.
MIN_TISSUE_FRACTION = 0.5

#: Thumbnail resolution used for tissue detection (µm per pixel).
TISSUE_MPP = 8.0

#: Longest side of the tissue-detection thumbnail (px); huge slides get a coarser mask, not a bigger one.
MAX_TISSUE_PX = 4096

#: Encoder sub-batch size on CPU (patches per forward pass); on a GPU it follows free memory
#: (``infer.auto_batch_size``). With freed memory kept for reuse (``runtime.keep_freed_memory``), 32 runs as
#: fast per image as 64 on EfficientNet-Lite0 at ~0.8 GB less peak RSS (``benchmarks/cpu_allocator.py``).
CPU_BATCH = 32

#: Most training epochs (early stopping on validation mean Pearson r usually ends sooner).
MAX_EPOCHS = 400

#: Pixel size plausibility window (µm/px): outside it a stated MPP is treated as absent
#: (72-dpi defaults in TIFF tags become 352.8 µm/px, which is not a microscope scan).
MPP_PLAUSIBLE = (0.05, 50.0)

#: Largest plain (untiled) image we decode whole, in pixels.
MAX_PLAIN_IMAGE_PIXELS = 2_000_000_000

#: Most lattice cells a run may have (rows x cols of the stride lattice over the whole slide): 4e8 is a
#: 100 mm x 100 mm slide at a 5 µm stride. A smaller stride on a big slide is refused up front.
MAX_LATTICE_CELLS = 400_000_000

#: Expression array dtype in the output cube.
EXPRESSION_DTYPE = "float16"

#: Decoded-tile cache per reader process (bytes): about a block row of border tiles on large slides.
TILE_CACHE_BYTES = 256 * 2**20

#: Largest level-0 side we accept (px): 1e6 px is 250 mm at 0.25 µm/px, beyond any glass slide.
#: Headers claiming more are corrupt or hostile and are refused before anything is allocated.
MAX_SLIDE_SIDE_PX = 1_000_000

#: Largest tile side (px) of a tiled TIFF we decode; bigger tiles would allocate huge buffers per read.
MAX_TILE_SIDE_PX = 16_384

#: Threads decoding the tiles of one super-tile (per reader process); codecs release the GIL.
DECODE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
