"""modelpress API service: routes, auth, job records, artifact streaming and the wire contract."""
