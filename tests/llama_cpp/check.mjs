// Run GGUF files in llama.cpp (its prebuilt CPU build, through node-llama-cpp) and print what it did,
// for tests/formats/test_llama_cpp.py to set beside lab's own answers.
//
//   node check.mjs jobs.json   ->   one JSON line per job on stdout
//
// A job: {"model": <.gguf path>, "text": <prompt>, "new_tokens": n}. Its answer: the ids llama.cpp
// tokenizes the text into (with BOS where the model's metadata asks for it, as llama.cpp's own tools
// do), its greedy continuation of them (temperature 0), and the continuation's tokens per second.
import { readFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
// the prebuilt CPU binary only: never build, never download, never look for a GPU
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
for (const job of jobs) {
  const model = await llama.loadModel({ modelPath: job.model });
  const text = model.tokenize(job.text, false);
  const ids = model.tokens.shouldPrependBosToken && model.tokens.bos !== null ? [model.tokens.bos, ...text] : text;
  const context = await model.createContext({ contextSize: ids.length + job.new_tokens + 8, threads: 2 });
  const sequence = context.getSequence();
  const continuation = [];
  const start = process.hrtime.bigint();
  for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
    continuation.push(token);
    if (continuation.length >= job.new_tokens) break;
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  console.log(JSON.stringify({ model: job.model, ids, continuation, tokens_per_s: continuation.length / seconds }));
  await context.dispose();
  await model.dispose();
}
await llama.dispose();
