"""Random nextrec-style configurations and inputs, shared by the model tests and benchmarks."""
from __future__ import annotations

import random

import torch

from nextrec_fast import features as F
from nextrec_fast.activations import ACTIVATION_NAMES


def random_features(rng: random.Random, feature_module=F):
    """A random mix: shared embedding names, every combiner, padding ids, dense with/without embedding."""
    sparse, sequence, dense = [], [], []
    tables = []  # (embedding_name, vocab, dim)
    for i in range(rng.randint(1, 4)):
        if tables and rng.random() < 0.3:
            name, vocab, dim = rng.choice(tables)
            sparse.append(feature_module.SparseFeature(f"sp{i}", vocab, embedding_name=name, embedding_dim=dim))
        else:
            vocab, dim = rng.randint(3, 40), rng.randint(1, 5)
            pad = rng.choice([None, None, 0, rng.randrange(vocab)])
            sparse.append(feature_module.SparseFeature(f"sp{i}", vocab, embedding_dim=dim, padding_idx=pad))
            tables.append((f"sp{i}", vocab, dim))
    for i in range(rng.randint(0, 3)):
        combiner = rng.choice(["mean", "sum", "concat"])
        max_len = rng.randint(1, 5)
        if tables and rng.random() < 0.3:
            name, vocab, dim = rng.choice(tables)
            pad = rng.choice([None, 0, rng.randrange(vocab)])
            sequence.append(feature_module.SequenceFeature(f"seq{i}", vocab, max_len=max_len, embedding_name=name,
                                                           embedding_dim=dim, combiner=combiner, padding_idx=pad))
        else:
            vocab, dim = rng.randint(3, 40), rng.randint(1, 5)
            pad = rng.choice([None, 0, rng.randrange(vocab)])
            sequence.append(feature_module.SequenceFeature(f"seq{i}", vocab, max_len=max_len, embedding_dim=dim,
                                                           combiner=combiner, padding_idx=pad))
            tables.append((f"seq{i}", vocab, dim))
    for i in range(rng.randint(0, 3)):
        input_dim, use_embedding = rng.randint(1, 3), rng.random() < 0.5
        # Without an embedding nextrec counts embedding_dim columns but passes input_dim through:
        # only consistent configurations (nextrec fails on the others, and so do we, earlier).
        embedding_dim = rng.choice([None, 1, 3]) if use_embedding else rng.choice([None, input_dim])
        dense.append(feature_module.DenseFeature(f"d{i}", embedding_dim=embedding_dim, input_dim=input_dim,
                                                 use_embedding=use_embedding))
    return dense, sparse, sequence


def random_inputs(dense, sparse, sequence, batch: int, generator: torch.Generator, dtype=torch.float32,
                  padding_fraction: float = 0.4, extra_len: int = 3):
    """Inputs as nextrec's data loader gives them: ids [B] / [B, L], dense [B] or [B, k]."""
    x = {}
    for f in sparse:
        x[f.name] = torch.randint(0, f.vocab_size, (batch,), generator=generator)
    for f in sequence:
        length = f.max_len + int(torch.randint(0, extra_len + 1, (1,), generator=generator))
        ids = torch.randint(0, f.vocab_size, (batch, length), generator=generator)
        pad = f.padding_idx if f.padding_idx is not None else 0
        padded = torch.rand(batch, length, generator=generator) < padding_fraction
        x[f.name] = torch.where(padded, torch.full_like(ids, pad), ids)
        x[f.name][0] = pad  # an all-padding row
    for f in dense:
        shape = (batch,) if f.input_dim == 1 else (batch, f.input_dim)
        x[f.name] = torch.randn(*shape, generator=generator, dtype=dtype)
    return x


def random_mlp_params(rng: random.Random, max_layers: int = 2):
    return {
        "dims": [rng.randint(1, 6) for _ in range(rng.randint(1, max_layers))],
        "activation": rng.choice(ACTIVATION_NAMES),
        "dropout": 0.0,
    }


def random_model_kwargs(model: str, rng: random.Random):
    """Constructor keyword arguments (besides features) for a random ESMM / MMOE / PLE."""
    tasks = rng.randint(1, 3)
    target = [f"t{i}" for i in range(tasks)]
    task = ["binary"] * tasks if tasks > 1 or rng.random() < 0.5 else "binary"
    if model == "esmm":
        return dict(ctr_params=random_mlp_params(rng, 3), cvr_params=random_mlp_params(rng, 3))
    towers = [random_mlp_params(rng, 2) for _ in range(tasks)]
    if model == "mmoe":
        return dict(expert_params=random_mlp_params(rng), num_experts=rng.randint(1, 8),
                    tower_params_list=towers, target=target, task=task)
    shared = random_mlp_params(rng)
    specific = dict(shared) if rng.random() < 0.6 else {**random_mlp_params(rng), "dims": shared["dims"][-1:]}
    if rng.random() < 0.3:
        specific = [dict(specific) for _ in range(tasks)]
    return dict(shared_expert_params=shared, specific_expert_params=specific,
                num_shared_experts=rng.randint(1, 3), num_specific_experts=rng.randint(1, 2),
                num_levels=rng.randint(1, 3), tower_params_list=towers, target=target, task=task)
