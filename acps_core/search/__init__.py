"""The search: ``auto_channel_prune_search`` from its arguments to the written config; the problem the search
methods solve (records, the cost model, the budget) and the decision they return."""
