"""Search: the best variant (by size, speed or KV cache) within a KL budget from the unpruned model."""
from dropquant.search.pick import NoCandidate, SearchResult, search
from dropquant.search.space import Candidate, Space
from dropquant.search.workbench import Workbench

__all__ = ["Candidate", "NoCandidate", "SearchResult", "Space", "Workbench", "search"]
