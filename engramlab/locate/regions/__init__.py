"""Parameter regions (Zhang et al., ACL 2024, "Unveiling Linguistic Regions in Large Language Models").

==========  =====================================================================================
module      concern
==========  =====================================================================================
importance  which tensors count (``region_tensors``) and their importance over a corpus: snip,
            snip-abs, wanda (``importance``), streamed, leaving the model as it was
masks       top / bottom / random regions per tensor or global, the core score across corpora,
            set-difference and graded language-specific regions, Jaccard overlap, mask files
==========  =====================================================================================
"""

from engramlab.lazy import lazy_exports

_IMPORTANCE = ("METHODS", "importance", "next_token_loss", "region_tensors")
_MASKS = ("bottom_mask", "bottom_masks", "core_scores", "jaccard", "load_masks", "overlap_matrix", "random_mask",
          "random_masks", "region_size", "save_masks", "specific_region", "specificity", "top_mask", "top_masks")
lazy_exports(__name__, {**{n: "engramlab.locate.regions.importance" for n in _IMPORTANCE},
                        **{n: "engramlab.locate.regions.masks" for n in _MASKS}},
             functions=("importance",))  # both a submodule and its main function

__all__ = [*_IMPORTANCE, *_MASKS]
