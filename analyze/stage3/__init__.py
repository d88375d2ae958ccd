"""Stage 3, interaction discovery (paper section 3.3): an FM over SAE activations, then the ablation sweep.

The package, one idea per module: `data` (the FM's rows: latents at the last tokens of harmful and
benign prompts), `fm` (the factorization machine and its fit), `probe` (the linear-probe baseline),
`models` (fits cached in `fm_models`), `rank` (candidates per prompt by FM cosine or probe weight),
`sweep` (ablate the stage-2 set plus the top-K, judge, ASR per K), and `stage` (settings, the
entry point `run`, summary lines). See `stage` for the protocol.
"""

from analyze.stage3.rank import rank_by_fm, rank_by_probe
from analyze.stage3.stage import (Stage3Result, Stage3Settings, asr_table, detail_lines, ensure_activations, run,
                                  stage2_sets, summary_line)

__all__ = ["Stage3Result", "Stage3Settings", "asr_table", "detail_lines", "ensure_activations", "rank_by_fm",
           "rank_by_probe", "run", "stage2_sets", "summary_line"]
