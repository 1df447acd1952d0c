"""Stage name -> function. A literal dict, so `grep STAGES` finds every stage."""
from lab.stages.analysis import analysis
from lab.stages.bench import bench
from lab.stages.chat import chat
from lab.stages.compare import compare
from lab.stages.dpo import dpo
from lab.stages.eval import evaluate
from lab.stages.export import export
from lab.stages.generate import generate
from lab.stages.multitask import multitask
from lab.stages.pipeline import pipeline
from lab.stages.plan import plan
from lab.stages.pretrain import pretrain
from lab.stages.serve import serve
from lab.stages.sft import sft
from lab.stages.surgery import surgery

STAGES = {
    "pretrain": pretrain,
    "sft": sft,
    "dpo": dpo,
    "pipeline": pipeline,
    "bench": bench,
    "compare": compare,
    "export": export,
    "surgery": surgery,
    "multitask": multitask,
    "analysis": analysis,
    "generate": generate,
    "chat": chat,
    "serve": serve,
    "eval": evaluate,
    "plan": plan,
}

