"""The analysis stage's kinds: `analysis=<kind>` -> the function that runs it. A literal dict, so
`grep KINDS` finds every kind. Each takes (run, sources, report), reads the checkpoints in
`sources`, writes its tables and figures into `report`, and trains nothing."""
from lab.analysis.adapter_rank import adapter_rank
from lab.analysis.alignment import alignment
from lab.analysis.capacity import capacity
from lab.analysis.attention import attention
from lab.analysis.concepts import concepts
from lab.analysis.layers import layers
from lab.analysis.tokenizer_stats import tokenizer_analysis

KINDS = {
    "capacity": capacity,
    "layers": layers,
    "adapter_rank": adapter_rank,
    "attention": attention,
    "alignment": alignment,
    "concepts": concepts,
    "tokenizer": tokenizer_analysis,
}
