"""Convert an upstream SAM / SAMv2 checkpoint (mmcv ``.pth``) into a bundle ``models/model.pt``.

The published weights of the upstream reference implementation
(https://github.com/alibaba-damo-academy/self-supervised-anatomical-embedding-v2, MIT licence) are hosted on
ModelScope, model ``viggin/Self-supervised_Anatomical_Embeddings``. ModelScope cannot be reached from the
machines this project is built on: download the ``.pth`` file where it can (for example
``modelscope download --model viggin/Self-supervised_Anatomical_Embeddings`` or the site's web page), then run::

    python scripts/convert_upstream.py --checkpoint upstream.pth --output bundles/semantic_sam/models/model.pt

Optional ``--width 1.0`` / ``--heads "['fine','coarse']"`` make the conversion fail unless the checkpoint is of
that kind. The script verifies every tensor by loading it into a fresh ``SAMv2Net`` and writes the plain state
dict atomically. It then prints the ``network_def`` overrides the bundle needs, e.g. for a SAM v1 checkpoint::

    --network_def#width 1.0 --network_def#heads "['fine','coarse']"

Security: mmcv checkpoints are full Python pickles (their ``meta`` holds more than tensors), so they are read
with ``torch.load(weights_only=False)``, which can execute code from the file. Convert only files you trust.

Exit status 0 on success; 1 with one ``ERROR: <file>: <problem>`` line on stderr when the checkpoint is
missing, unreadable or not a SAM/SAMv2 checkpoint (nothing is written then).
"""

from __future__ import annotations

import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.errors import SAMv2Error
from samv2_components.networks.upstream import convert_upstream_checkpoint
from samv2_components.networks.weights import format_network_kwargs, network_def_overrides


def main(checkpoint: str, output: str, width: float | None = None, heads=None) -> None:
    """Convert ``checkpoint`` (upstream mmcv ``.pth``) to ``output`` (bundle ``model.pt``).

    Args:
        checkpoint: the upstream SAM / SAMv2 checkpoint (trusted file: it is fully unpickled).
        output: the bundle weights file to write, e.g. ``bundles/semantic_sam/models/model.pt``.
        width: fail unless the checkpoint has this width (1.0 for the published networks).
        heads: fail unless the checkpoint has these heads, e.g. ``"['fine','coarse']"`` for SAM v1.
    """
    try:
        kwargs = convert_upstream_checkpoint(checkpoint, output, width=width, heads=heads)
    except SAMv2Error as error:
        sys.stderr.write(f"ERROR: {error}\n")
        sys.stderr.flush()
        sys.exit(1)
    print(f"wrote {output} ({format_network_kwargs(kwargs)})")
    print("run the bundle with these network_def overrides:")
    print(f"  {network_def_overrides(kwargs)}")


if __name__ == "__main__":
    fire.Fire(main)
