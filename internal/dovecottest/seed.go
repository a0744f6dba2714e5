package dovecottest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// seedEpoch is the Date of message 1; message N is N-1 minutes later.
var seedEpoch = time.Date(2024, 1, 2, 3, 4, 0, 0, time.UTC)

// bigMessageSize is the approximate size of one message in "Big".
const bigMessageSize = 1 << 20

// seedUser writes home/Maildir for one user directly, in the Maildir++
// layout Dovecot uses by default: INBOX in Maildir/{cur,new,tmp}, the
// mailbox "Big" in Maildir/.Big with a maildirfolder marker, and a
// subscriptions file. Files go in cur/ with a ":2," info suffix; Dovecot
// assigns UIDs on first SELECT in filename (timestamp) order, so UID N is
// "msg N". Everything is owned by uid:gid.
func seedUser(home, user string, small, bigN, uid, gid int) error {
	md := filepath.Join(home, "Maildir")
	if err := mkMaildir(md); err != nil {
		return err
	}
	for i := 1; i <= small; i++ {
		if err := writeMessage(md, user, i, smallMessage(user, i)); err != nil {
			return err
		}
	}
	if bigN > 0 {
		bd := filepath.Join(md, ".Big")
		if err := mkMaildir(bd); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(bd, "maildirfolder"), nil, 0o600); err != nil {
			return err
		}
		for i := 1; i <= bigN; i++ {
			if err := writeMessage(bd, user, i, bigMessage(user, i)); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(md, "subscriptions"), []byte("Big\n"), 0o600); err != nil {
			return err
		}
	}
	return chownTree(home, uid, gid)
}

func mkMaildir(dir string) error {
	for _, sub := range []string{"cur", "new", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return err
		}
	}
	return nil
}

// writeMessage stores msg (LF line endings) as message n of a maildir.
// S= is the file size and W= the size with CRLF line endings, as Dovecot
// itself would name it.
func writeMessage(maildir, user string, n int, msg []byte) error {
	date := seedEpoch.Add(time.Duration(n-1) * time.Minute)
	path := filepath.Join(maildir, "cur", messageName(n, msg))
	if err := os.WriteFile(path, msg, 0o600); err != nil {
		return err
	}
	// A maildir message's mtime is its INTERNALDATE.
	return os.Chtimes(path, date, date)
}

// messageName is the file name of msg as message n of a maildir.
func messageName(n int, msg []byte) string {
	date := seedEpoch.Add(time.Duration(n-1) * time.Minute)
	size := len(msg)
	vsize := size + bytes.Count(msg, []byte("\n"))
	return fmt.Sprintf("%d.M%06dP1.dovecottest,S=%d,W=%d:2,", date.Unix(), n, size, vsize)
}

// message builds message n of the given kind ("msg" or "big") for user.
// Subjects are distinct: "msg 3 for user0001", "big 1 for user0001".
func message(user, kind string, n int, body func(*bytes.Buffer)) []byte {
	date := seedEpoch.Add(time.Duration(n-1) * time.Minute)
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: Sender %d <sender%d@example.org>\n", n, n)
	fmt.Fprintf(&b, "To: %s <%s@example.org>\n", user, user)
	fmt.Fprintf(&b, "Subject: %s %d for %s\n", kind, n, user)
	fmt.Fprintf(&b, "Date: %s\n", date.Format(time.RFC1123Z))
	fmt.Fprintf(&b, "Message-ID: <%s.%d.%s@dovecottest.invalid>\n", kind, n, user)
	b.WriteString("MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n")
	body(&b)
	return b.Bytes()
}

func smallMessage(user string, n int) []byte {
	return message(user, "msg", n, func(b *bytes.Buffer) {
		fmt.Fprintf(b, "Hello %s,\n\nthis is message %d.\n", user, n)
	})
}

func bigMessage(user string, n int) []byte {
	return message(user, "big", n, func(b *bytes.Buffer) {
		const line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab\n"
		for b.Len() < bigMessageSize {
			b.WriteString(line)
		}
	})
}

func chownTree(root string, uid, gid int) error {
	return filepath.WalkDir(root, func(path string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
}
