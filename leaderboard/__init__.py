"""capbench_leaderboard: renders the static CAP leaderboard from the results database."""
