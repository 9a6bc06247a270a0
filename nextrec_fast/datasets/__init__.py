"""Real datasets for demos and quality tests (tooling: pandas and numpy, nothing of nextrec)."""
from nextrec_fast.datasets.movielens import MOVIELENS_HINT, MovieLens, find_movielens_100k, movielens_100k

__all__ = ["MOVIELENS_HINT", "MovieLens", "find_movielens_100k", "movielens_100k"]
