"""Train a small Llama with the Hugging Face Trainer and autoaccum: 64 sequences per step.

    python examples/hf_trainer.py                      # CPU: a simulated 16 MiB GPU
    python examples/hf_trainer.py --squeeze 5:6        # step 5 runs out of memory; absorbed
    python examples/hf_trainer.py --simulate-gpu-mem 0 --micro-batch-size 16   # pinned split

`AutoAccumTrainer` is a `transformers.Trainer` that takes `target_batch_size=` (samples per
optimizer step) instead of `per_device_train_batch_size` x `gradient_accumulation_steps`: each
loader batch is one optimizer step, and autoaccum cuts it into micro-batches that fit in memory.
The causal-LM loss is accumulated over tokens (sum over the step's label tokens / their count), so
every step equals one big batch however it was cut.

The model is a randomly initialised `LlamaForCausalLM` built from a `LlamaConfig` (nothing is
downloaded). The data is synthetic and learnable: each sequence counts up from a random token in a
random stride (t, t+s, t+2s, ... mod the vocabulary), 8 to 64 tokens long, padded per batch with
labels -100. The loss falls from about 5.5 (log 256) as the model learns to continue the count.
Without CUDA a SimulatedDevice stands in for a GPU, so the plan can be watched on a laptop.
"""

import argparse
import logging
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import autoaccum
from autoaccum.integrations.transformers import AutoAccumTrainer

# Default simulated memory without CUDA. Measured with SimulatedDevice for this model (2 layers,
# hidden 64, vocabulary 256, float32): parameters and AdamW's two moments take 1.2 MiB, their
# gradients 0.4 MiB more, and a micro-batch of b sequences of 64 tokens about 0.82 MiB * b (the
# logits and their float32 softmax dominate). The planner keeps a margin of the free memory spare,
# so 16 MiB gives micro-batches of about 16: 4 per step of 64.
DEFAULT_SIM_MIB = 16.0

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=16, help="optimizer steps")
parser.add_argument("--micro-batch-size", type=int, default=None, help="pin it (default: plan)")
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--simulate-gpu-mem", type=float, default=None, metavar="MIB",
                    help=f"simulated device memory in MiB; 0 = off "
                         f"(default: {DEFAULT_SIM_MIB} without CUDA, off with CUDA)")
parser.add_argument("--squeeze", metavar="STEP:MIB",
                    help="in the middle of optimizer step STEP (from 1), shrink the simulated "
                         "memory to MIB: the micro-batch runs out of memory and is halved")
parser.add_argument("--output-dir", default="hf_trainer_out")
args = parser.parse_args()

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s",
                    datefmt="%H:%M:%S")
torch.manual_seed(args.seed)
cuda = torch.cuda.is_available()
VOCAB, MAX_LEN = 256, 64


# -- data: synthetic counting sequences, padded per batch ----------------------------------------
class Counting(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequence i counts from a random start in a random stride (1..7), mod VOCAB - 1, shifted by
    one so that token 0 stays the padding token. Seeded per index: the same in every run."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        length = int(torch.randint(8, MAX_LEN + 1, (), generator=g))
        start = int(torch.randint(VOCAB - 1, (), generator=g))
        stride = int(torch.randint(1, 8, (), generator=g))
        ids = (start + stride * torch.arange(length)) % (VOCAB - 1) + 1
        return {"input_ids": ids}


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; padding is masked and labelled -100."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = labels[i, :n] = f["input_ids"]
    return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}


dataset = Counting(args.target_batch_size * args.steps, args.seed)

# -- model and memory --------------------------------------------------------------------------
config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=MAX_LEN, pad_token_id=0)
model = LlamaForCausalLM(config)

sim_mib = args.simulate_gpu_mem
if sim_mib is None and not cuda:
    sim_mib = DEFAULT_SIM_MIB
memory = autoaccum.SimulatedDevice(capacity_bytes=int(sim_mib * 2**20)) if sim_mib else None
if args.squeeze and memory is None:
    parser.error("--squeeze changes a simulated device: add --simulate-gpu-mem MIB")


class Report(TrainerCallback):
    """One line per optimizer step from the Trainer's logs (autoaccum adds its plan to them),
    and --squeeze: the simulated memory shrinks in the first forward pass of the chosen step,
    after autoaccum planned that step from the memory then free."""

    def on_log(self, targs: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            print(f"step {state.global_step:3d}/{state.max_steps}: loss {logs['loss']:.3f}  "
                  f"lr {logs['learning_rate']:.2e}  {logs['accumulation_steps']} micro-batches "
                  f"of up to {logs['micro_batch_size']}  oom events {logs['oom_events']}")

    def on_step_begin(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
        if not args.squeeze or memory is None:
            return
        step_txt, _, mib_txt = args.squeeze.partition(":")
        if state.global_step + 1 != int(step_txt):
            return

        def squeeze(*_: Any) -> None:
            print(f"squeeze: step {step_txt}: simulated memory "
                  f"{memory.capacity_bytes / 2**20:.1f} -> {float(mib_txt):.1f} MiB")
            memory.capacity_bytes = int(float(mib_txt) * 2**20)
            handle.remove()

        handle = kw["model"].model.layers[0].register_forward_pre_hook(squeeze)


# -- training ----------------------------------------------------------------------------------
training_args = TrainingArguments(
    output_dir=args.output_dir,
    max_steps=args.steps,
    learning_rate=args.lr,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    max_grad_norm=1.0,  # clipped once per optimizer step, on the full gradient
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    use_cpu=not cuda,
    seed=args.seed,
    dataloader_num_workers=0,
)
trainer = AutoAccumTrainer(
    model=model,
    args=training_args,
    train_dataset=dataset,
    data_collator=collate,
    callbacks=[Report()],
    target_batch_size=args.target_batch_size,
    micro_batch_size=args.micro_batch_size,
    memory=memory,
)
trainer.remove_callback(PrinterCallback)  # Report prints the logs instead

print(f"device {'cuda' if cuda else 'cpu'}, memory {memory}, {len(dataset)} sequences -> "
      f"{args.steps} optimizer steps of {args.target_batch_size}")
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start

opt = trainer.autoaccum_optimizer
assert opt is not None
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("\nsummary")
print(f"optimizer steps:  {opt.optimizer_steps}")
print(f"samples per step: {sorted({h.samples for h in opt.history})}")
print(f"loss mode:        {trainer.autoaccum_loss_mode}")
print(f"oom events:       {opt.oom_events}")
print(f"final plan:       {opt.plan}")
print(f"loss:             {losses[0]:.3f} -> {losses[-1]:.3f}")
print(f"time:             {seconds:.1f} s")
