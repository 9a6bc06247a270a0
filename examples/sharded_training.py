"""An accelerated nextrec 0.6 MMOE with its embedding tables sharded by TorchRec.

    torchrun --nproc_per_node 2 examples/sharded_training.py            # CPU: gloo
    torchrun --nnodes N --nproc_per_node 8 ... examples/sharded_training.py   # GPUs: nccl

Each rank reads its own batches; the tables are sharded table-wise (``--sharding``) and trained by
FBGEMM's fused row-wise Adagrad inside the backward, the dense part by Adam under DDP. The steps
run on TorchRec's TrainPipelineSparseDist (the next batch's ids travel to their tables' ranks
while this batch trains); ``--no-pipeline`` runs the same steps in a plain loop.
"""
import argparse
import logging
import os

import torch
import torch.distributed as dist
from nextrec.basic.features import DenseFeature, SequenceFeature, SparseFeature
from nextrec.models.multitask.mmoe import MMOE
from torchrec.optim import RowWiseAdagrad

import nextrec_fast
from nextrec_fast import sharding

parser = argparse.ArgumentParser()
parser.add_argument("--sharding", default="table_wise", help="table_wise, row_wise, column_wise, data_parallel "
                    "or planner (TorchRec's planner chooses)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--no-pipeline", action="store_true", help="a plain loop instead of TorchRec's pipeline")
args = parser.parse_args()
logging.getLogger().setLevel(logging.WARNING)  # after importing nextrec and TorchRec: they log every table at INFO

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
if torch.cuda.is_available():
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

dense = [DenseFeature("price")]
sparse = [SparseFeature("user", vocab_size=100_000, embedding_dim=16),
          SparseFeature("item", vocab_size=50_000, embedding_dim=16)]
sequence = [SequenceFeature("history", vocab_size=50_000, max_len=20, embedding_dim=16,
                            embedding_name="item", combiner="mean")]   # shares the item table; padding id 0
torch.manual_seed(0)                                       # the same initial weights on every rank
model = MMOE(dense, sparse, sequence, expert_mlp_params={"hidden_dims": [64, 32]}, num_experts=4,
             tower_mlp_params_list=[{"hidden_dims": [16]}] * 2, target=["click", "buy"])
nextrec_fast.accelerate(model)
dmp = sharding.shard_model(model, sharding=None if args.sharding == "planner" else args.sharding,
                           table_optimizer=(RowWiseAdagrad, {"lr": 0.05}) if args.sharding != "data_parallel" else None)
dense_optimizer = torch.optim.Adam(sharding.dense_parameters(dmp).values(), lr=1e-3)
device = next(iter(sharding.dense_parameters(dmp).values())).device


def batches(n):
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for _ in range(n):
        yield {"price": torch.rand(256, generator=generator),
               "user": torch.randint(1, 100_000, (256,), generator=generator),
               "item": torch.randint(1, 50_000, (256,), generator=generator),
               "history": torch.randint(0, 50_000, (256, 20), generator=generator),
               "click": torch.randint(0, 2, (256,), generator=generator).float(),
               "buy": torch.randint(0, 2, (256,), generator=generator).float()}


losses = []                                                # the pipeline returns outputs only: keep the loss here


def loss_fn(logits, batch):                                # [B, 2] (0.6: logits; the head is call_model's)
    labels = torch.stack([batch["click"], batch["buy"]], dim=1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    losses.append(loss.detach())
    return loss


# padded ids -> KeyedJaggedTensor, in the data path (a DataLoader's collate_fn; here on ready batches)
collate = sharding.KJTCollate(model, collate=None, pipelined=not args.no_pipeline)
if args.no_pipeline:
    for step, batch in enumerate(map(collate, batches(args.steps))):
        x = {k: v.to(device) for k, v in batch.items()}
        dense_optimizer.zero_grad()
        loss = loss_fn(dmp(x), x)
        loss.backward()                                    # the tables are updated here
        dense_optimizer.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.6f}")
else:
    pipeline = sharding.train_pipeline(dmp, loss_fn, dense_optimizer)
    it, step = map(collate, batches(args.steps)), 0
    while True:
        try:
            logits = pipeline.progress(it)                 # zero_grad, forward, backward, both optimisers
        except StopIteration:
            break
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {losses[-1].item():.6f}")
        step += 1

plan = {table: s.sharding_type for table, s in dmp.plan.plan["embedding.ebc"].items()}
state = sharding.gathered_state_dict(dmp)                  # whole tables, nextrec's keys, on rank 0
if rank == 0:
    print("plan:", plan)
    print("gathered:", {k: f"{tuple(v.shape)} sum {v.double().sum().item():.6f}" for k, v in state.items() if "embed_dict" in k})
    # torch.save(state, "mmoe.pt") loads into the unsharded nextrec model: model.load_state_dict(state)
dist.destroy_process_group()
