// pgjdbc through pgsplit. Every case checks its results and where each
// statement ran: inet_server_port() is the replica's port for a read outside
// a transaction block, the primary's for writes and transaction blocks.
//
// Env: PGSPLIT_URL, PGSPLIT_PRIMARY_PORT, PGSPLIT_REPLICA_PORT,
// PGSPLIT_DIRECT_PRIMARY_URL. Replication is synchronous (remote_apply), so a
// read after a committed write sees it. Arguments, if any, select the cases
// whose names contain them.

import java.net.URI;
import java.net.URLDecoder;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.postgresql.PGStatement;
import org.postgresql.util.PSQLException;

public final class Clients {
    private static String proxyUrl;
    private static String directUrl;
    private static int primary;
    private static int replica;
    private static final List<Connection> OPENED = new ArrayList<>();

    private static final String[] TABLES = {
        "java_prep", "java_evict", "java_threshold", "java_batch", "java_batch_rw", "java_tx", "java_ro", "java_fetch", "java_err",
    };

    // ------------------------------------------------------------ helpers

    /** postgres://user:pass@host:port/db?k=v → jdbc:postgresql://host:port/db?user=..&password=..&k=v */
    static String jdbcUrl(String url, String extra) {
        URI u = URI.create(url);
        if (!"postgres".equals(u.getScheme()) && !"postgresql".equals(u.getScheme())) {
            throw new IllegalArgumentException("not a postgres:// URL: " + url);
        }
        String db = u.getRawPath() == null || u.getRawPath().length() <= 1 ? "postgres" : u.getRawPath().substring(1);
        StringBuilder s = new StringBuilder("jdbc:postgresql://")
            .append(u.getHost()).append(':').append(u.getPort() == -1 ? 5432 : u.getPort())
            .append('/').append(db);
        List<String> params = new ArrayList<>();
        String info = u.getRawUserInfo();
        if (info != null) {
            int colon = info.indexOf(':');
            String user = colon < 0 ? info : info.substring(0, colon);
            params.add("user=" + enc(dec(user)));
            if (colon >= 0) {
                params.add("password=" + enc(dec(info.substring(colon + 1))));
            }
        }
        if (u.getRawQuery() != null && !u.getRawQuery().isEmpty()) {
            params.add(u.getRawQuery());
        }
        params.add("connectTimeout=10");
        params.add("loginTimeout=10");
        params.add("socketTimeout=60");
        params.add("ApplicationName=pgsplit-clients-java");
        if (!extra.isEmpty()) {
            params.add(extra);
        }
        return s.append('?').append(String.join("&", params)).toString();
    }

    static String dec(String s) {
        return URLDecoder.decode(s.replace("+", "%2B"), StandardCharsets.UTF_8);
    }

    static String enc(String s) {
        return URLEncoder.encode(s, StandardCharsets.UTF_8);
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            System.err.println("java: " + name + " is not set");
            System.exit(2);
        }
        return v;
    }

    static int port(String name) {
        String v = env(name);
        try {
            int p = Integer.parseInt(v);
            if (p > 0 && p < 65536) {
                return p;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        System.err.println("java: " + name + "=" + v + " is not a port");
        System.exit(2);
        return 0;
    }

    /** A connection to the proxy with extra JDBC URL parameters; closed after the case. */
    static Connection open(String extra) throws SQLException {
        Connection c = DriverManager.getConnection(jdbcUrl(proxyUrl, extra));
        OPENED.add(c);
        return c;
    }

    static final class Failure extends RuntimeException {
        private static final long serialVersionUID = 1L;

        Failure(String msg) {
            super(msg);
        }
    }

    static void check(boolean ok, String msg) {
        if (!ok) {
            throw new Failure(msg);
        }
    }

    static void eq(Object actual, Object expected, String what) {
        String a = actual instanceof int[] ? Arrays.toString((int[]) actual) : String.valueOf(actual);
        String e = expected instanceof int[] ? Arrays.toString((int[]) expected) : String.valueOf(expected);
        check(a.equals(e), what + ": expected " + e + ", got " + a);
    }

    static void onPrimary(int p, String what) {
        check(p == primary, what + ": ran on port " + p + ", expected the primary (" + primary + "); replica is " + replica);
    }

    static void onReplica(int p, String what) {
        check(p == replica, what + ": ran on port " + p + ", expected the replica (" + replica + "); primary is " + primary);
    }

    /** Runs a query that must return exactly one row; returns its columns as strings. */
    static String[] one(PreparedStatement ps, String what) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            return oneRow(rs, what);
        }
    }

    static String[] one(Connection c, String sql, String what) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            return oneRow(rs, what);
        }
    }

    static String[] oneRow(ResultSet rs, String what) throws SQLException {
        check(rs.next(), what + ": no row");
        int n = rs.getMetaData().getColumnCount();
        String[] row = new String[n];
        for (int i = 0; i < n; i++) {
            row[i] = rs.getString(i + 1);
        }
        check(!rs.next(), what + ": more than one row");
        return row;
    }

    static int readPort(Connection c, String what) throws SQLException {
        return Integer.parseInt(one(c, "SELECT inet_server_port()", what)[0]);
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    interface Body {
        void run() throws Exception;
    }

    static SQLException expectError(String sqlstate, String what, Body body) throws Exception {
        try {
            body.run();
        } catch (SQLException e) {
            check(sqlstate.equals(e.getSQLState()),
                what + ": expected SQLSTATE " + sqlstate + ", got " + e.getSQLState() + ": " + e.getMessage());
            return e;
        }
        throw new Failure(what + ": succeeded, expected SQLSTATE " + sqlstate);
    }

    static boolean serverPrepared(PreparedStatement ps) throws SQLException {
        return ps.unwrap(PGStatement.class).isUseServerPrepare();
    }

    // ------------------------------------------------------------ cases

    /** prepareThreshold=1: every PreparedStatement is a server-side named statement from its first use. */
    static void namedStatements() throws Exception {
        Connection c = open("prepareThreshold=1");
        exec(c, "CREATE TABLE java_prep (id int PRIMARY KEY, v text NOT NULL)");
        String readSql = "SELECT inet_server_port(), v FROM java_prep WHERE id = ?";
        PreparedStatement w = c.prepareStatement("INSERT INTO java_prep (id, v) VALUES (?, ?) RETURNING inet_server_port()");
        PreparedStatement r = c.prepareStatement(readSql);
        for (int i = 1; i <= 10; i++) {
            w.setInt(1, i);
            w.setString(2, "value " + i);
            onPrimary(Integer.parseInt(one(w, "insert " + i)[0]), "prepared INSERT, execution " + i);
            check(serverPrepared(w), "the INSERT is not a server-side statement after execution " + i);
            r.setInt(1, i);
            String[] row = one(r, "read " + i);
            onReplica(Integer.parseInt(row[0]), "prepared SELECT, execution " + i);
            eq(row[1], "value " + i, "read " + i);
            check(serverPrepared(r), "the SELECT is not a server-side statement after execution " + i);
        }
        // The replica's session holds the read as a protocol-level named statement.
        try (PreparedStatement q = c.prepareStatement(
                "SELECT inet_server_port(), count(*) FROM pg_prepared_statements WHERE NOT from_sql AND statement = ?")) {
            q.setString(1, readSql.replace("?", "$1"));
            String[] row = one(q, "pg_prepared_statements");
            onReplica(Integer.parseInt(row[0]), "pg_prepared_statements read");
            eq(row[1], "1", "named statements for the SELECT in the replica session");
        }
        // The same named read inside a transaction block runs on the primary and
        // sees the block's own write; after the block it is back on the replica.
        c.setAutoCommit(false);
        w.setInt(1, 100);
        w.setString(2, "in block");
        onPrimary(Integer.parseInt(one(w, "insert in block")[0]), "prepared INSERT in a block");
        r.setInt(1, 100);
        String[] inBlock = one(r, "read in block");
        onPrimary(Integer.parseInt(inBlock[0]), "prepared SELECT in a block");
        eq(inBlock[1], "in block", "the block sees its own write");
        c.rollback();
        c.setAutoCommit(true);
        try (ResultSet rs = r.executeQuery()) {
            check(!rs.next(), "the rolled-back row is visible");
        }
        r.setInt(1, 7);
        String[] after = one(r, "read after the block");
        onReplica(Integer.parseInt(after[0]), "prepared SELECT after the block");
        eq(after[1], "value 7", "read after the block");
        // A named statement survives an error in its own execution.
        w.setInt(1, 7);
        w.setString(2, "dup");
        expectError("23505", "prepared INSERT of a duplicate", () -> one(w, "dup"));
        w.setInt(1, 11);
        w.setString(2, "eleven");
        onPrimary(Integer.parseInt(one(w, "insert after the error")[0]), "prepared INSERT after an error");
        w.close();
        r.close();
    }

    /**
     * A statement cache of two queries: the driver closes evicted named
     * statements (Close) and prepares them again under new names.
     */
    static void cacheEviction() throws Exception {
        Connection c = open("prepareThreshold=1&preparedStatementCacheQueries=2");
        exec(c, "CREATE TABLE java_evict (id int PRIMARY KEY, k int NOT NULL)");
        String[] reads = {
            "SELECT inet_server_port(), count(*) FROM java_evict WHERE k = ?",
            "SELECT inet_server_port(), coalesce(sum(id), 0) FROM java_evict WHERE k = ?",
            "SELECT inet_server_port(), coalesce(max(id), 0) FROM java_evict WHERE k = ?",
        };
        String[] writes = {
            "INSERT INTO java_evict VALUES (?, ?) RETURNING inet_server_port()",
            "INSERT INTO java_evict (k, id) VALUES (?, ?) RETURNING inet_server_port()",
        };
        int id = 0;
        for (int round = 0; round < 4; round++) {
            for (int w = 0; w < writes.length; w++) {
                try (PreparedStatement ps = c.prepareStatement(writes[w])) {
                    id++;
                    ps.setInt(w == 0 ? 1 : 2, id);
                    ps.setInt(w == 0 ? 2 : 1, id % 3);
                    onPrimary(Integer.parseInt(one(ps, "write " + id)[0]), "INSERT form " + w + ", round " + round);
                }
            }
            for (int r = 0; r < reads.length; r++) {
                for (int k = 0; k < 3; k++) {
                    try (PreparedStatement ps = c.prepareStatement(reads[r])) {
                        ps.setInt(1, k);
                        String[] row = one(ps, "read " + r + " k=" + k);
                        onReplica(Integer.parseInt(row[0]), "SELECT form " + r + ", round " + round);
                        long want = 0;
                        for (int i = 1; i <= id; i++) {
                            if (i % 3 == k) {
                                want = r == 0 ? want + 1 : r == 1 ? want + i : Math.max(want, i);
                            }
                        }
                        eq(row[1], want, "SELECT form " + r + " for k=" + k + " after " + id + " rows");
                    }
                }
            }
        }
        // The evictions really happened: three SELECT forms were prepared on
        // the replica again and again, and its session holds at most the two
        // the driver still caches (the others were closed).
        String[] row = one(c, "SELECT inet_server_port(), count(*), string_agg(statement, '; ') FROM pg_prepared_statements"
            + " WHERE NOT from_sql AND statement LIKE '%FROM java' || '_evict WHERE k = $1'", "prepared count");
        onReplica(Integer.parseInt(row[0]), "pg_prepared_statements read");
        int live = Integer.parseInt(row[1]);
        check(live >= 1 && live <= 2, live + " named SELECT statements in the replica session, expected 1 or 2: " + row[2]);
    }

    /** The driver's default prepareThreshold (5): unnamed statements first, then named ones. */
    static void thresholdCrossing() throws Exception {
        Connection c = open("");
        exec(c, "CREATE TABLE java_threshold (id int PRIMARY KEY, n int NOT NULL)");
        PreparedStatement w = c.prepareStatement("INSERT INTO java_threshold VALUES (?, ?) RETURNING inet_server_port()");
        PreparedStatement r = c.prepareStatement("SELECT inet_server_port(), sum(n) FROM java_threshold WHERE id <= ?");
        List<Boolean> modes = new ArrayList<>();
        int sum = 0;
        for (int i = 1; i <= 9; i++) {
            w.setInt(1, i);
            w.setInt(2, i * 10);
            onPrimary(Integer.parseInt(one(w, "insert " + i)[0]), "INSERT, execution " + i);
            sum += i * 10;
            r.setInt(1, i);
            String[] row = one(r, "sum " + i);
            onReplica(Integer.parseInt(row[0]), "SELECT, execution " + i);
            eq(row[1], sum, "sum after " + i + " inserts");
            modes.add(serverPrepared(r));
        }
        check(!modes.get(0) && modes.get(modes.size() - 1),
            "the SELECT never switched from unnamed to named statements: " + modes);
        w.close();
        r.close();
    }

    static void batch(String table, String extra, boolean rewritten) throws Exception {
        Connection c = open(extra);
        // The default records where each row was written.
        exec(c, "CREATE TABLE " + table + " (id int PRIMARY KEY, v text, port int NOT NULL DEFAULT inet_server_port())");
        PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " (id, v) VALUES (?, ?)");
        int total = 0;
        for (int round = 0; round < 3; round++) {
            int n = 40;
            for (int i = 0; i < n; i++) {
                ins.setInt(1, total + i);
                ins.setString(2, "row " + (total + i));
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            eq(counts.length, n, "executeBatch result count, round " + round);
            for (int k : counts) {
                if (rewritten) {
                    check(k == 1 || k == Statement.SUCCESS_NO_INFO, "rewritten batch update count " + k + " in " + Arrays.toString(counts));
                } else {
                    eq(k, 1, "batch update count, round " + round);
                }
            }
            total += n;
            String[] row = one(c, "SELECT inet_server_port(), count(*), min(port), max(port), sum(id) FROM " + table, "count");
            onReplica(Integer.parseInt(row[0]), "read after batch " + round);
            eq(row[1], total, "rows after batch " + round);
            onPrimary(Integer.parseInt(row[2]), "batch insert (lowest port recorded)");
            onPrimary(Integer.parseInt(row[3]), "batch insert (highest port recorded)");
            eq(row[4], (long) total * (total - 1) / 2, "sum of ids after batch " + round);
        }
        // A batch with a duplicate fails with 23505 and, in autocommit mode, writes none of its rows.
        for (int id : new int[] {1000, 1001, 5, 1002}) {
            ins.setInt(1, id);
            ins.setString(2, "dup batch");
            ins.addBatch();
        }
        SQLException e = expectError("23505", "batch with a duplicate id", ins::executeBatch);
        check(e instanceof BatchUpdateException, "the batch error is a " + e.getClass().getName());
        ins.clearBatch();
        String[] row = one(c, "SELECT inet_server_port(), count(*) FROM " + table + " WHERE v = 'dup batch'", "dup count");
        onReplica(Integer.parseInt(row[0]), "read after the failed batch");
        eq(row[1], 0, "rows of the failed batch");
        // A batch inside a transaction block, then rolled back.
        c.setAutoCommit(false);
        for (int i = 0; i < 10; i++) {
            ins.setInt(1, 2000 + i);
            ins.setString(2, "in block");
            ins.addBatch();
        }
        eq(ins.executeBatch().length, 10, "batch in a block");
        String[] inBlock = one(c, "SELECT inet_server_port(), count(*) FROM " + table + " WHERE v = 'in block'", "in block");
        onPrimary(Integer.parseInt(inBlock[0]), "read in the block after a batch");
        eq(inBlock[1], 10, "the block sees its batch");
        c.rollback();
        c.setAutoCommit(true);
        String[] afterRb = one(c, "SELECT inet_server_port(), count(*) FROM " + table, "after rollback");
        onReplica(Integer.parseInt(afterRb[0]), "read after the rolled-back batch");
        eq(afterRb[1], total, "rows after the rolled-back batch");
        ins.close();
    }

    static void batchPlain() throws Exception {
        batch("java_batch", "prepareThreshold=1", false);
    }

    static void batchRewritten() throws Exception {
        batch("java_batch_rw", "prepareThreshold=1&reWriteBatchedInserts=true", true);
    }

    static void transaction() throws Exception {
        Connection c = open("prepareThreshold=1");
        Connection other = open("prepareThreshold=1");
        exec(c, "CREATE TABLE java_tx (id int PRIMARY KEY, v text)");
        PreparedStatement ins = c.prepareStatement("INSERT INTO java_tx VALUES (?, ?) RETURNING inet_server_port()");
        String countSql = "SELECT inet_server_port(), count(*), coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM java_tx";
        onReplica(readPort(c, "before the block"), "read before setAutoCommit(false)");

        c.setAutoCommit(false);
        // The driver sends BEGIN together with the first statement.
        onPrimary(readPort(c, "first statement of the block"), "first SELECT of a block");
        ins.setInt(1, 1);
        ins.setString(2, "one");
        onPrimary(Integer.parseInt(one(ins, "insert 1")[0]), "INSERT in a block");
        String[] mine = one(c, countSql, "count in block");
        onPrimary(Integer.parseInt(mine[0]), "SELECT in a block after a write");
        eq(mine[2], "1", "the block sees its own write");
        String[] theirs = one(other, countSql, "other before commit");
        onReplica(Integer.parseInt(theirs[0]), "another session's read");
        eq(theirs[2], "", "another session sees uncommitted rows");
        c.commit();
        // Still autocommit=false: the next statement opens a new block.
        onPrimary(readPort(c, "first statement of the second block"), "first SELECT of the second block");
        String[] afterCommit = one(other, countSql, "other after commit");
        onReplica(Integer.parseInt(afterCommit[0]), "read after commit");
        eq(afterCommit[2], "1", "rows after commit");

        ins.setInt(1, 2);
        ins.setString(2, "two");
        onPrimary(Integer.parseInt(one(ins, "insert 2")[0]), "INSERT in the second block");
        c.rollback();
        String[] afterRollback = one(other, countSql, "other after rollback");
        onReplica(Integer.parseInt(afterRollback[0]), "read after rollback");
        eq(afterRollback[2], "1", "rows after rollback");

        // Savepoints.
        ins.setInt(1, 3);
        ins.setString(2, "three");
        onPrimary(Integer.parseInt(one(ins, "insert 3")[0]), "INSERT before a savepoint");
        Savepoint sp = c.setSavepoint("java_sp");
        ins.setInt(1, 4);
        ins.setString(2, "four");
        onPrimary(Integer.parseInt(one(ins, "insert 4")[0]), "INSERT after a savepoint");
        c.rollback(sp);
        onPrimary(readPort(c, "after rollback to savepoint"), "SELECT after ROLLBACK TO SAVEPOINT");
        c.commit();
        c.setAutoCommit(true);
        String[] end = one(c, countSql, "final count");
        onReplica(Integer.parseInt(end[0]), "read after setAutoCommit(true)");
        eq(end[2], "1,3", "rows after the savepoint rollback");
        ins.close();
    }

    /** setReadOnly(true) with autocommit off: the driver sends BEGIN READ ONLY, which runs on the replica. */
    static void readOnlyTransaction() throws Exception {
        Connection c = open("prepareThreshold=1");
        exec(c, "CREATE TABLE java_ro (id int PRIMARY KEY)");
        exec(c, "INSERT INTO java_ro SELECT generate_series(1, 5)");
        c.setReadOnly(true);
        c.setAutoCommit(false);
        String[] row = one(c, "SELECT inet_server_port(), count(*), current_setting('transaction_read_only') FROM java_ro", "read-only block");
        onReplica(Integer.parseInt(row[0]), "SELECT in a read-only block");
        eq(row[1], 5, "rows seen in the read-only block");
        eq(row[2], "on", "transaction_read_only in the block");
        onReplica(readPort(c, "second read"), "second SELECT in the read-only block");
        expectError("25006", "INSERT in a read-only block", () -> exec(c, "INSERT INTO java_ro VALUES (6)"));
        c.rollback();
        c.setReadOnly(false);
        c.commit();
        onPrimary(readPort(c, "read-write block"), "SELECT in a read-write block");
        c.rollback();
        c.setAutoCommit(true);
        onReplica(readPort(c, "after the blocks"), "read after the blocks");
    }

    /** setFetchSize in a transaction: the driver reads a portal in chunks, one Execute and Sync per chunk. */
    static void fetchSize() throws Exception {
        Connection c = open("prepareThreshold=1");
        exec(c, "CREATE TABLE java_fetch (id int PRIMARY KEY)");
        exec(c, "INSERT INTO java_fetch SELECT generate_series(1, 1000)");
        for (boolean readOnly : new boolean[] {false, true}) {
            String what = readOnly ? "read-only block" : "block";
            c.setReadOnly(readOnly);
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT id, inet_server_port() FROM java_fetch WHERE id > ? ORDER BY id")) {
                ps.setFetchSize(100);
                ps.setInt(1, 0);
                int n = 0;
                long sum = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        n++;
                        sum += rs.getInt(1);
                        int p = rs.getInt(2);
                        if (readOnly) {
                            onReplica(p, "chunked read in a " + what + ", row " + n);
                        } else {
                            onPrimary(p, "chunked read in a " + what + ", row " + n);
                        }
                        if (n == 150) {
                            // Another statement between two chunks.
                            if (readOnly) {
                                onReplica(readPort(c, "between chunks"), "SELECT between chunks in a " + what);
                            } else {
                                onPrimary(readPort(c, "between chunks"), "SELECT between chunks in a " + what);
                            }
                        }
                    }
                }
                eq(n, 1000, "rows fetched in chunks in a " + what);
                eq(sum, 500500L, "sum of ids fetched in a " + what);
            }
            c.commit();
            c.setAutoCommit(true);
            c.setReadOnly(false);
        }
        onReplica(readPort(c, "after the blocks"), "read after the blocks");
    }

    /** setQueryTimeout: the driver sends a cancel request, which reaches the server running the statement. */
    static void queryTimeout() throws Exception {
        Connection c = open("prepareThreshold=1");
        for (boolean inBlock : new boolean[] {false, true}) {
            String what = inBlock ? "a statement in a block (primary)" : "a read (replica)";
            c.setAutoCommit(!inBlock);
            try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(30), inet_server_port()")) {
                ps.setQueryTimeout(1);
                long t0 = System.nanoTime();
                expectError("57014", "query timeout of " + what, () -> one(ps, "sleep"));
                long ms = (System.nanoTime() - t0) / 1_000_000;
                check(ms < 10_000, "cancelling " + what + " took " + ms + " ms");
            }
            if (inBlock) {
                expectError("25P02", "statement after the cancelled one in the block", () -> readPort(c, "aborted"));
                c.rollback();
                c.setAutoCommit(true);
            }
            onReplica(readPort(c, "after the cancel"), "read after cancelling " + what);
        }
    }

    static void sqlStates() throws Exception {
        Connection c = open("prepareThreshold=1");
        exec(c, "CREATE TABLE java_err (id int PRIMARY KEY, v text NOT NULL)");
        exec(c, "INSERT INTO java_err VALUES (1, 'one')");
        PreparedStatement ins = c.prepareStatement("INSERT INTO java_err VALUES (?, ?)");
        ins.setInt(1, 1);
        ins.setString(2, "dup");
        SQLException dup = expectError("23505", "duplicate key", ins::executeUpdate);
        check(dup instanceof PSQLException, "the error is a " + dup.getClass().getName());
        eq(((PSQLException) dup).getServerErrorMessage().getConstraint(), "java_err_pkey", "constraint of the duplicate");
        ins.setInt(1, 2);
        ins.setNull(2, java.sql.Types.VARCHAR);
        expectError("23502", "NULL in a NOT NULL column", ins::executeUpdate);
        expectError("22012", "division by zero (a read)", () -> one(c, "SELECT 1/0", "1/0"));
        expectError("42P01", "unknown table", () -> one(c, "SELECT * FROM java_err_missing", "missing"));
        expectError("42601", "syntax error", () -> exec(c, "SELEKT 1"));
        try (PreparedStatement p = c.prepareStatement("SELECT ?::int")) {
            p.setString(1, "not a number");
            expectError("22P02", "invalid integer parameter", () -> one(p, "cast"));
        }
        onReplica(readPort(c, "after errors"), "read after errors outside a block");

        c.setAutoCommit(false);
        exec(c, "INSERT INTO java_err VALUES (2, 'two')");
        ins.setInt(1, 2);
        ins.setString(2, "two again");
        expectError("23505", "duplicate key in a block", ins::executeUpdate);
        expectError("25P02", "statement in an aborted block", () -> readPort(c, "aborted"));
        c.rollback();
        c.setAutoCommit(true);
        String[] row = one(c, "SELECT inet_server_port(), string_agg(id::text, ',' ORDER BY id) FROM java_err", "after rollback");
        onReplica(Integer.parseInt(row[0]), "read after the aborted block");
        eq(row[1], "1", "rows after the aborted block");
        ins.setInt(1, 3);
        ins.setString(2, "three");
        eq(ins.executeUpdate(), 1, "the statement works again after the errors");
        ins.close();
    }

    // ------------------------------------------------------------ runner

    /** Run with PGSPLIT_TLS_CA set: the URL asks for verify-full (every case goes over TLS). */
    static void tls() throws Exception {
        check(proxyUrl.contains("sslmode=verify-full"), "the URL asks for verify-full: " + proxyUrl);
        try (Connection c = open("")) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT 1")) {
                check(r.next() && r.getInt(1) == 1, "SELECT 1 over TLS");
            }
        }
        String other = System.getenv("PGSPLIT_TLS_OTHER_CA");
        String wrong = proxyUrl.replaceAll("sslrootcert=[^&]*", "sslrootcert=" + enc(other));
        try (Connection c = DriverManager.getConnection(jdbcUrl(wrong, ""))) {
            check(c == null, "a certificate from another CA was accepted");
        } catch (SQLException e) {
            check(e.getSQLState() != null && e.getSQLState().startsWith("08"),
                "a wrong CA is a connection error: " + e + " [" + e.getSQLState() + "]");
        }
    }

    public static void main(String[] args) throws Exception {
        proxyUrl = env("PGSPLIT_URL");
        directUrl = env("PGSPLIT_DIRECT_PRIMARY_URL");
        primary = port("PGSPLIT_PRIMARY_PORT");
        replica = port("PGSPLIT_REPLICA_PORT");
        DriverManager.setLoginTimeout(10);
        String driver = org.postgresql.Driver.class.getPackage().getImplementationVersion();
        System.out.println("java: " + System.getProperty("java.version") + ", pgjdbc " + driver);

        try (Connection admin = DriverManager.getConnection(jdbcUrl(directUrl, ""))) {
            check(primary != replica, "PGSPLIT_PRIMARY_PORT and PGSPLIT_REPLICA_PORT are both " + primary);
            onPrimary(readPort(admin, "direct primary"), "PGSPLIT_DIRECT_PRIMARY_URL");
            exec(admin, "DROP TABLE IF EXISTS " + String.join(", ", TABLES));
        } catch (Exception e) {
            System.out.println("java: cannot prepare the cases: " + e);
            System.exit(2);
        }

        Map<String, Body> cases = new LinkedHashMap<>();
        cases.put("prepareThreshold=1: named statements, reads and writes repeated", Clients::namedStatements);
        cases.put("statement cache eviction: named statements closed and prepared again", Clients::cacheEviction);
        cases.put("default prepareThreshold: switching to named statements", Clients::thresholdCrossing);
        cases.put("batch insert", Clients::batchPlain);
        cases.put("batch insert with reWriteBatchedInserts=true", Clients::batchRewritten);
        cases.put("transaction: setAutoCommit(false), commit, rollback, savepoint", Clients::transaction);
        cases.put("read-only transaction (setReadOnly)", Clients::readOnlyTransaction);
        cases.put("setFetchSize: a portal read in chunks in a transaction", Clients::fetchSize);
        cases.put("setQueryTimeout: cancel requests", Clients::queryTimeout);
        cases.put("SQLException.getSQLState()", Clients::sqlStates);
        if (System.getenv("PGSPLIT_TLS_CA") != null) {
            cases.put("TLS: sslmode=verify-full against the CA, a wrong CA refused", Clients::tls);
        }

        int passed = 0;
        List<String> failed = new ArrayList<>();
        for (Map.Entry<String, Body> e : cases.entrySet()) {
            String name = e.getKey();
            if (args.length > 0 && Arrays.stream(args).noneMatch(name::contains)) {
                continue;
            }
            long t0 = System.nanoTime();
            try {
                e.getValue().run();
                passed++;
                System.out.printf("ok   java/%s (%d ms)%n", name, (System.nanoTime() - t0) / 1_000_000);
            } catch (Throwable t) {
                failed.add(name);
                String msg = t instanceof Failure ? t.getMessage() : t.toString();
                if (t instanceof SQLException) {
                    msg += " [SQLSTATE " + ((SQLException) t).getSQLState() + "]";
                }
                System.out.println("FAIL java/" + name + ": " + msg);
                if (System.getenv("PGSPLIT_CLIENTS_VERBOSE") != null || !(t instanceof Failure)) {
                    for (StackTraceElement el : t.getStackTrace()) {
                        if (el.getClassName().startsWith("Clients")) {
                            System.out.println("       at " + el);
                        }
                    }
                }
            } finally {
                for (Connection c : OPENED) {
                    try {
                        c.close();
                    } catch (SQLException ignored) {
                        // closing after a failure
                    }
                }
                OPENED.clear();
            }
        }
        System.out.println("java: " + passed + " passed, " + failed.size() + " failed");
        for (String f : failed) {
            System.out.println("  failed: java/" + f);
        }
        System.exit(failed.isEmpty() ? 0 : 1);
    }
}
