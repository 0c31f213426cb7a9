"""Scale-out (issue 16): engine replicas behind one endpoint on Ray Serve, with cache-aware routing.

routing.py  which replica takes a request: the one holding its longest prompt prefix (chained block hashes), a
            session's replica, or the least loaded; round-robin for comparison (no Ray needed)
asgi.py     one HTTP request through an in-process ASGI app, streamed: how a replica runs tierlm's own server app
"""
