"""Zero-shot splits: which classes a model trains on (seen) and which it must recognise unseen.

COCO: 48 seen and 17 unseen of the 80 classes (Bansal et al., ECCV 2018), as indices into the classes
ordered by category id; the other 15 are never used. NUS-WIDE: the 925 user tags that are not among
the 81 concepts are seen (``read_nuswide_tags``), the 81 human-labelled concepts unseen (Huynh and
Elhamifar, CVPR 2020); generalised zero-shot scores all 1,006.
"""

from __future__ import annotations

COCO_SEEN = (
    0, 1, 2, 3, 6, 7, 8, 13, 14, 17, 18, 21, 22, 23, 24, 26, 28, 29, 30, 33, 37, 39, 42, 44, 45, 46, 47, 48,
    49, 50, 51, 53, 54, 56, 59, 61, 62, 63, 64, 65, 68, 69, 70, 72, 73, 74, 75, 79,
)  # fmt: skip
COCO_UNSEEN = (4, 5, 15, 16, 19, 20, 25, 27, 31, 36, 41, 43, 55, 57, 66, 71, 76)
