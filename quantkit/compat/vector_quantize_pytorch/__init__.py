"""Drop-in replacements for vector-quantize-pytorch's quantizers: change the import, keep the code.

    # from vector_quantize_pytorch import VectorQuantize, ResidualVQ, FSQ, LFQ
    from quantkit.compat.vector_quantize_pytorch import VectorQuantize, ResidualVQ, FSQ, LFQ

Each class takes the peer's constructor keywords with the peer's defaults, has the peer's forward signature and
returns the peer's tuple (index dtypes included: int64 for VQ / LFQ, int32 for FSQ). Underneath is quantkit's own
quantizer (fused nearest-codeword search, no N x K matrices), and three peer bugs are gone: ``accept_image_fmap``
with ResidualVQ, ``mask`` with ``codebook_dim != dim``, and indices that drift from the output in training.

A keyword quantkit does not implement raises :class:`UnsupportedKeywordError` naming it and the quantkit equivalent;
``docs/compat_vector_quantize_pytorch.md`` has the full table (``keyword_table_markdown(VectorQuantize.keywords)``).
``load_peer_state_dict(peer.state_dict())`` copies a trained peer module's weights into its adapter.
"""
from ._common import UnsupportedKeywordError, keyword_table_markdown
from .binary_mapper import BinaryMapper
from .fsp import FSP
from .fsq import FSQ, ResidualFSQ
from .grouped_residual import GroupedResidualFSQ, GroupedResidualLFQ
from .hierarchical import HierarchicalVQ
from .latent_quantize import LatentQuantize
from .lfq import LFQ, ResidualLFQ
from .random_projection import RandomProjectionQuantizer
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .simvq import ResidualSimVQ, SimVQ
from .vq import VectorQuantize

__all__ = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "FSQ", "ResidualFSQ", "LFQ", "ResidualLFQ",
           "UnsupportedKeywordError", "keyword_table_markdown",
           "FSP", "GroupedResidualFSQ", "GroupedResidualLFQ", "BinaryMapper",
           "SimVQ", "ResidualSimVQ", "LatentQuantize", "RandomProjectionQuantizer", "HierarchicalVQ"]
