"""Stage name -> function. A literal dict, so `grep STAGES` finds every stage."""
from lab.stages.bench import bench
from lab.stages.compare import compare
from lab.stages.pretrain import pretrain

STAGES = {
    "pretrain": pretrain,
    "bench": bench,
    "compare": compare,
}
