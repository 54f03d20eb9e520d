"""PostgreSQL: connections, migrations, the flush transaction behind a store
object, queries, retention, the embedded server. The only layer that imports
psycopg2."""
