// Run GGUF files in llama.cpp (its prebuilt CPU build, through node-llama-cpp) and print what it did,
// for tests/formats/test_llama_cpp.py to set beside lab's own answers.
//
//   node check.mjs jobs.json   ->   one JSON line per job on stdout
//
// A job: {"model": <.gguf path>, "text": <prompt> or "ids": [token ids], "new_tokens": n, "threads": t (2),
// "kv_cache": "F16" (llama.cpp's default) or "F32", the type its KV cache stores keys and values in}.
// Its answer: the ids llama.cpp tokenizes the text into (with BOS where the model's metadata asks for
// it, as llama.cpp's own tools do), or the ids given; its greedy continuation of them (temperature 0);
// the continuation's tokens per second (the prompt's prefill included), and its decoding's alone
// (decode_tokens_per_s: the tokens after the first over the time after the first).
import { readFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
// the prebuilt CPU binary only: never build, never download, never look for a GPU
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
for (const job of jobs) {
  const model = await llama.loadModel({ modelPath: job.model });
  let ids = job.ids;
  if (ids === undefined) {
    const text = model.tokenize(job.text, false);
    ids = model.tokens.shouldPrependBosToken && model.tokens.bos !== null ? [model.tokens.bos, ...text] : text;
  }
  const kv = job.kv_cache ?? "F16";
  const context = await model.createContext({ contextSize: ids.length + job.new_tokens + 8, threads: job.threads ?? 2,
                                              experimentalKvCacheKeyType: kv, experimentalKvCacheValueType: kv });
  const sequence = context.getSequence();
  const continuation = [];
  const start = process.hrtime.bigint();
  let first = start;
  for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
    continuation.push(token);
    if (continuation.length === 1) first = process.hrtime.bigint();
    if (continuation.length >= job.new_tokens) break;
  }
  const end = process.hrtime.bigint();
  const seconds = Number(end - start) / 1e9;
  const decode_tokens_per_s = (continuation.length - 1) / (Number(end - first) / 1e9);
  console.log(JSON.stringify({ model: job.model, ids, continuation, tokens_per_s: continuation.length / seconds,
                               decode_tokens_per_s }));
  await context.dispose();
  await model.dispose();
}
await llama.dispose();
