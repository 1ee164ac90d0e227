"""SAMv2 anatomical embeddings as MONAI components.

Layers, bottom to top (a module imports only its own layer or lower ones, and no import circles; enforced by
``tests/test_layering.py``, which holds the table):

0. ``errors``
1. pure helpers: ``geometry``, ``modality``, ``sample_data``, ``bundle_schema``
2. ``io``
3. ``transforms``, ``losses``, ``metrics``, ``visualize``
4. ``networks``
5. ``inference``
6. ``engines``
7. ``matching``
8. ``registration``
9. ``bundle_support``
10. front ends: ``serving``, ``cli``
"""

__version__ = "0.1.0"
