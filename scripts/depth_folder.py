"""Write a transformer folder with a family's full depth and narrow blocks (random weights from a seed), to run the
product at a production model's depth on a CPU: graph size, export and check behave as at full size, the arithmetic
is small.

    python scripts/depth_folder.py --family flux --out /tmp/flux-depth     # FLUX.1's 19 + 38 blocks, about 2 MB
    python -m shiva_export build --model /tmp/flux-depth --height 256 --width 256 --context-tokens 24 --out /tmp/art

`docs/benchmarks/README.md` ("FLUX.1 depth on the CPU") has what that build measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the depth of each family's production model, with the narrow widths of the tiny presets
CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38,
                                            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                            pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=[8, 12, 12])),
    "sd35-medium": ("SD3Transformer2DModel", dict(sample_size=32, patch_size=2, in_channels=16, num_layers=24,
                                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                  caption_projection_dim=32, pooled_projection_dim=32,
                                                  out_channels=16, qk_norm="rms_norm",
                                                  dual_attention_layers=tuple(range(13)))),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--out", required=True, help="folder to write (config.json + safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import diffusers
    import torch

    name, config = CONFIGS[args.family]
    torch.manual_seed(args.seed)
    model = getattr(diffusers, name)(**config).eval()
    model.save_pretrained(Path(args.out), safe_serialization=True)
    print(f"{args.out}: {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
