package dovecottest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// LargeUser is the user that Options.Large adds, after user0001..userNNNN;
// its password follows Options.Password like any other ("pw-large").
const LargeUser = "large"

// Large describes mailboxes at the scale of real ones, for tests of what
// the proxy does with huge responses. They belong to LargeUser. The zero
// value adds no user. Dovecot puts no limit on a response line, so each
// fixture makes one long line.
type Large struct {
	// Messages is the number of messages in INBOX. They are hard links
	// of largeBases small files (Subject "large K", K = 1 + (N-1) mod
	// largeBases for message N), so 20,000 cost little: `UID SEARCH ALL`
	// is then one line of about 109 KB, as are SORT and THREAD.
	Messages int
	// Recipients > 0 adds the mailbox "Recipients" holding one message
	// whose To: lists that many addresses ("Rcpt 0001"
	// <rcpt0001@example.org>, ...): `FETCH 1 (ENVELOPE)` is one line of
	// about 42 bytes per address (4,000 make 168 KB).
	Recipients int
	// MIMEDepth and MIMEWidth > 0 add the mailbox "MIME" holding one
	// message whose body is a tree of multipart/mixed parts MIMEDepth
	// levels deep, each with MIMEWidth children, and MIMEWidth^MIMEDepth
	// text/plain leaves: `FETCH 1 (BODYSTRUCTURE)` grows by about 87
	// bytes a leaf (depth 4, width 5: 625 leaves, 54 KB). Dovecot
	// parses at most 100 levels and 10,000 parts of a message.
	MIMEDepth, MIMEWidth int
}

func (l Large) zero() bool {
	return l.Messages <= 0 && l.Recipients <= 0 && (l.MIMEDepth <= 0 || l.MIMEWidth <= 0)
}

// largeBases is the number of distinct messages behind Large.Messages:
// enough for SORT and THREAD to have something to order.
const largeBases = 100

// seedLarge writes LargeUser's Maildir. Files are written (and owned by
// uid:gid) once per distinct message; the rest of INBOX is hard links,
// each under its own name so that Dovecot gives it its own UID, in order.
func seedLarge(home string, l Large, uid, gid int) error {
	md := filepath.Join(home, "Maildir")
	if err := mkMaildir(md); err != nil {
		return err
	}
	if err := chownTree(home, uid, gid); err != nil {
		return err
	}
	var first []string // the files of messages 1..largeBases
	for i := 1; i <= l.Messages; i++ {
		if i <= largeBases {
			msg := largeMessage(i)
			if err := writeMessage(md, LargeUser, i, msg); err != nil {
				return err
			}
			path := filepath.Join(md, "cur", messageName(i, msg))
			if err := os.Lchown(path, uid, gid); err != nil {
				return err
			}
			first = append(first, path)
			continue
		}
		base := first[(i-1)%largeBases]
		// The name carries its own timestamp (UID order) but the size
		// of the file it links to.
		_, sizes, _ := strings.Cut(filepath.Base(base), ",")
		name := fmt.Sprintf("%d.M%06dP1.dovecottest,%s", seedEpoch.Add(time.Duration(i-1)*time.Minute).Unix(), i, sizes)
		if err := os.Link(base, filepath.Join(md, "cur", name)); err != nil {
			return err
		}
	}

	if l.Recipients > 0 {
		if err := seedFolder(md, "Recipients", recipientsMessage(l.Recipients), uid, gid); err != nil {
			return err
		}
	}
	if l.MIMEDepth > 0 && l.MIMEWidth > 0 {
		if err := seedFolder(md, "MIME", mimeMessage(l.MIMEDepth, l.MIMEWidth), uid, gid); err != nil {
			return err
		}
	}
	return nil
}

// seedFolder makes the mailbox name holding msg as its only message.
func seedFolder(md, name string, msg []byte, uid, gid int) error {
	dir := filepath.Join(md, "."+name)
	if err := mkMaildir(dir); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "maildirfolder"), nil, 0o600); err != nil {
		return err
	}
	if err := writeMessage(dir, LargeUser, 1, msg); err != nil {
		return err
	}
	return chownTree(dir, uid, gid)
}

// header writes the headers common to the large fixtures, up to the
// MIME headers.
func header(b *bytes.Buffer, n int, subject string) {
	date := seedEpoch.Add(time.Duration(n-1) * time.Minute)
	fmt.Fprintf(b, "From: Sender %d <sender%d@example.org>\n", n, n)
	fmt.Fprintf(b, "Subject: %s\n", subject)
	fmt.Fprintf(b, "Date: %s\n", date.Format(time.RFC1123Z))
	fmt.Fprintf(b, "Message-ID: <large.%s.%d@dovecottest.invalid>\n", strings.ReplaceAll(subject, " ", "."), n)
	b.WriteString("MIME-Version: 1.0\n")
}

func largeMessage(k int) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "To: %s <%s@example.org>\n", LargeUser, LargeUser)
	header(&b, k, "large "+strconv.Itoa(k))
	fmt.Fprintf(&b, "Content-Type: text/plain; charset=us-ascii\n\nThis is large message %d.\n", k)
	return b.Bytes()
}

// recipientsMessage has a To: of n addresses, folded so that no header
// line is longer than about 80 bytes.
func recipientsMessage(n int) []byte {
	var b bytes.Buffer
	b.WriteString("To: ")
	for i := 1; i <= n; i++ {
		if i > 1 {
			b.WriteString(",\n\t")
		}
		fmt.Fprintf(&b, "Rcpt %04d <rcpt%04d@example.org>", i, i)
	}
	b.WriteString("\n")
	header(&b, 1, fmt.Sprintf("to %d recipients", n))
	b.WriteString("Content-Type: text/plain; charset=us-ascii\n\nHello all.\n")
	return b.Bytes()
}

// mimeMessage has a body that is a tree of multipart/mixed parts, depth
// levels deep, width children each.
func mimeMessage(depth, width int) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "To: %s <%s@example.org>\n", LargeUser, LargeUser)
	header(&b, 1, fmt.Sprintf("mime tree %dx%d", depth, width))
	mimeEntity(&b, depth, width, "1")
	return b.Bytes()
}

// mimeEntity writes one body part, its Content-Type header first; path
// ("1.3.2") names it and makes its boundary unique.
func mimeEntity(b *bytes.Buffer, depth, width int, path string) {
	if depth == 0 {
		fmt.Fprintf(b, "Content-Type: text/plain; charset=us-ascii\n\npart %s\n", path)
		return
	}
	boundary := "=_b" + path
	fmt.Fprintf(b, "Content-Type: multipart/mixed; boundary=\"%s\"\n\n", boundary)
	for i := 1; i <= width; i++ {
		fmt.Fprintf(b, "--%s\n", boundary)
		mimeEntity(b, depth-1, width, path+"."+strconv.Itoa(i))
	}
	fmt.Fprintf(b, "--%s--\n", boundary)
}

// indexLarge has Dovecot build LargeUser's INBOX index now, so that a
// test's first SELECT is not the one to pay for it, and checks the count.
func (s *Server) indexLarge(l Large) error {
	if l.Messages <= 0 {
		return nil
	}
	out, err := s.doveadm("mailbox", "status", "-u", LargeUser, "messages", "INBOX")
	if err != nil {
		return fmt.Errorf("dovecottest: index %s INBOX: %w: %s", LargeUser, err, out)
	}
	// Flow format: "INBOX messages=20000".
	if want := "INBOX messages=" + strconv.Itoa(l.Messages); out != want {
		return fmt.Errorf("dovecottest: index %s INBOX: doveadm says %q, want %q", LargeUser, out, want)
	}
	return nil
}
