package io.ersspark.delta;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Iterator;

import io.delta.storage.S3SingleDriverLogStore;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;

/**
 * A Delta LogStore for S3 that is safe with several writing drivers: a commit file is created with a
 * conditional PUT ({@code If-None-Match: *}, Hadoop S3A's {@code fs.option.create.conditional.overwrite}),
 * so when two drivers race for version N the store lets exactly one of them create it and the other
 * gets {@link java.nio.file.FileAlreadyExistsException}, which Delta's optimistic concurrency answers by
 * checking for conflicts and retrying at N+1.
 *
 * <p>Delta's own S3 LogStore checks for the file and then writes it, which is safe within one JVM only.
 * The store must honour conditional writes (AWS S3 since 2024, MinIO, Versity's gateway); on one that
 * ignores them two writers can still overwrite each other, as with the default LogStore.
 *
 * <p>S3A retries a PUT that failed in transit; when the first attempt had landed, the retry gets 412
 * for a file this writer created. The file's bytes tell the two cases apart: a commit file holds this
 * transaction's own commitInfo (timestamp, txnId), so identical bytes mean the write is ours.
 *
 * <p>Enable: {@code spark.delta.logStore.s3a.impl=io.ersspark.delta.S3ConditionalLogStore}, with this
 * class's jar on the driver's classpath ({@code deploy/fetch_jars.sh} builds it).
 */
public class S3ConditionalLogStore extends S3SingleDriverLogStore {
    static final String CONDITIONAL_CREATE = "fs.option.create.conditional.overwrite";

    public S3ConditionalLogStore(Configuration hadoopConf) {
        super(hadoopConf);
    }

    @Override
    public void write(Path path, Iterator<String> actions, Boolean overwrite, Configuration hadoopConf)
            throws IOException {
        if (overwrite) {
            super.write(path, actions, true, hadoopConf);
            return;
        }
        byte[] body = join(actions);
        FileSystem fs = path.getFileSystem(hadoopConf);
        try (FSDataOutputStream out =
                 (FSDataOutputStream) fs.createFile(path).overwrite(false).must(CONDITIONAL_CREATE, true).build()) {
            out.write(body);
        } catch (IOException e) {
            if (!isAlreadyThere(e)) {
                throw e;
            }
            if (Arrays.equals(body, readAll(fs, path))) {
                return; // our own earlier attempt created it
            }
            java.nio.file.FileAlreadyExistsException taken =
                new java.nio.file.FileAlreadyExistsException(path.toString());
            taken.initCause(e);
            throw taken;
        }
    }

    /** The store refused the create because the object exists: S3A's 412 (RemoteFileChangedException)
     *  or an existence check (FileAlreadyExistsException), possibly wrapped. */
    static boolean isAlreadyThere(Throwable e) {
        for (Throwable t = e; t != null; t = t.getCause()) {
            String name = t.getClass().getSimpleName();
            if (name.equals("RemoteFileChangedException") || name.equals("FileAlreadyExistsException")) {
                return true;
            }
        }
        return false;
    }

    static byte[] join(Iterator<String> actions) {
        StringBuilder text = new StringBuilder();
        while (actions.hasNext()) {
            text.append(actions.next()).append('\n');
        }
        return text.toString().getBytes(StandardCharsets.UTF_8);
    }

    static byte[] readAll(FileSystem fs, Path path) throws IOException {
        try (InputStream in = fs.open(path)) {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream();
            in.transferTo(bytes);
            return bytes.toByteArray();
        }
    }
}
